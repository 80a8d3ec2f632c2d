//! Every screen as a pure function of the [`App`]. Plain ASCII borders and
//! no colours, so serial and dumb terminals show the same thing; emphasis
//! is bold and reverse video only.

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::symbols::border;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::Frame;

use super::app::{App, Check, Choice, Confirm, Screen, SetupForm, Verdict, SETUP_ROWS};

const ASCII: border::Set = border::Set {
    top_left: "+",
    top_right: "+",
    bottom_left: "+",
    bottom_right: "+",
    vertical_left: "|",
    vertical_right: "|",
    horizontal_top: "-",
    horizontal_bottom: "-",
};

fn block(title: &str) -> Block<'_> {
    Block::default()
        .borders(Borders::ALL)
        .border_set(ASCII)
        .title(format!(" {title} "))
}

fn bold(text: impl Into<String>) -> Span<'static> {
    Span::styled(text.into(), Style::default().add_modifier(Modifier::BOLD))
}

fn keys_line(text: &str) -> Line<'static> {
    Line::from(Span::styled(
        text.to_string(),
        Style::default().add_modifier(Modifier::REVERSED),
    ))
}

/// Draws the current screen.
pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let [body, footer] = Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(area);
    let (title, lines, keys) = match &app.screen {
        Screen::Welcome { selected } => welcome(app, *selected),
        Screen::CreateName { name } => (
            "Create a new cluster",
            vec![
                Line::from("This node becomes the first member of a new cluster: it creates"),
                Line::from("the cluster's certificate authority and an admin token."),
                Line::from(""),
                Line::from(vec![
                    Span::raw("Cluster name (optional): "),
                    bold(format!("{name}_")),
                ]),
            ],
            "Type a name, Enter create, Esc back",
        ),
        Screen::TokenEntry { text, error } => {
            let mut lines = vec![
                Line::from("Paste the join token printed by `allod cluster join-token` (or the"),
                Line::from("console's dashboard) on a member of the cluster."),
                Line::from(""),
                Line::from(vec![
                    Span::raw("Token: "),
                    bold(format!("{}_", shorten(text, 60))),
                ]),
                Line::from(format!("({} characters)", text.len())),
            ];
            if let Some(error) = error {
                lines.push(Line::from(""));
                lines.push(Line::from(vec![bold("Error: "), Span::raw(error.clone())]));
            }
            (
                "Join an existing cluster",
                lines,
                "Enter continue, Backspace erase, Esc back",
            )
        }
        Screen::ConfirmFingerprint { token, .. } => {
            let mut lines = vec![
                Line::from(vec![Span::raw("Cluster: "), bold(token.cluster_id.clone())]),
                Line::from("Members in the token:"),
            ];
            for m in token.members.iter().take(5) {
                lines.push(Line::from(format!(
                    "  {} peer {} api {}",
                    m.name, m.peer_addr, m.api_addr
                )));
            }
            lines.push(Line::from(""));
            lines.push(Line::from(
                "The cluster's CA certificate fingerprint (SHA-256) is:",
            ));
            for chunk in fingerprint_rows(&token.ca_fingerprint) {
                lines.push(Line::from(vec![Span::raw("  "), bold(chunk)]));
            }
            lines.push(Line::from(""));
            lines.push(Line::from(
                "Compare it with the one on the dashboard of a member you trust.",
            ));
            (
                "Confirm the cluster",
                lines,
                "Y the fingerprint matches, N no, Esc back",
            )
        }
        Screen::Preflight { checks, .. } => preflight(checks),
        Screen::Setup { form, cursor } => setup_form(app, form, *cursor),
        Screen::Working {
            title,
            steps,
            outcome,
        } => {
            let mut lines: Vec<Line> = steps
                .iter()
                .rev()
                .take(12)
                .rev()
                .map(|s| Line::from(format!("  * {s}")))
                .collect();
            let keys = match outcome {
                None => {
                    lines.push(Line::from("  ... working"));
                    "Please wait"
                }
                Some(Ok(done)) => {
                    lines.push(Line::from(""));
                    lines.push(Line::from(bold(done.clone())));
                    "Enter continue"
                }
                Some(Err(failure)) => {
                    lines.push(Line::from(""));
                    lines.push(Line::from(vec![
                        bold("Failed: "),
                        Span::raw(failure.clone()),
                    ]));
                    lines.push(Line::from(
                        "Nothing was changed on this node; it is still unconfigured. Fix the cause and retry.",
                    ));
                    "Enter back to the start"
                }
            };
            (title.as_str(), lines, keys)
        }
        Screen::Dashboard => dashboard(app),
        Screen::Confirming(what) => {
            let question = match what {
                Confirm::JoinToken => {
                    "Create a single-use join token (valid for 1 hour) for the next node?"
                }
                Confirm::Leave => "Remove this node from the cluster? Its VMs must be moved first.",
                Confirm::Maintenance { on: true } => {
                    "Put this node into maintenance? It takes no new VMs until taken out."
                }
                Confirm::Maintenance { on: false } => {
                    "Take this node out of maintenance? It takes new VMs again."
                }
            };
            (
                "Confirm",
                vec![Line::from(""), Line::from(bold(question))],
                "Y yes, N no",
            )
        }
        Screen::ShowToken { token } => {
            let mut lines = vec![
                Line::from("On the next node, choose \"Join an existing cluster\" and paste:"),
                Line::from(""),
            ];
            let width = area.width.saturating_sub(4).max(20) as usize;
            for chunk in token.as_bytes().chunks(width) {
                lines.push(Line::from(String::from_utf8_lossy(chunk).to_string()));
            }
            lines.push(Line::from(""));
            lines.push(Line::from("It can be used once, within an hour."));
            ("Join token", lines, "Enter back to the dashboard")
        }
    };
    let mut lines = lines;
    if let Some(note) = &app.note {
        lines.push(Line::from(""));
        lines.push(Line::from(vec![bold("Note: "), Span::raw(note.clone())]));
    }
    frame.render_widget(
        Paragraph::new(lines)
            .block(block(title))
            .wrap(Wrap { trim: false }),
        body,
    );
    frame.render_widget(Paragraph::new(keys_line(keys)), footer);
}

fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        text.to_string()
    } else {
        format!("...{}", &text[text.len() - (max - 3)..])
    }
}

fn shorten_end(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}...", text.chars().take(max - 3).collect::<String>())
    }
}

fn fingerprint_rows(fingerprint: &str) -> Vec<String> {
    let pairs: Vec<String> = fingerprint
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect();
    pairs.chunks(16).map(|row| row.join(":")).collect()
}

fn size(bytes: u64) -> String {
    crate::units::human_size(bytes)
}

fn identity(app: &App) -> Vec<Line<'static>> {
    let Some(facts) = &app.facts else {
        return vec![Line::from("Reading this machine's hardware...")];
    };
    let mut lines = vec![
        Line::from(vec![
            Span::raw("Node "),
            bold(facts.hostname.clone()),
            Span::raw(format!(
                "   {} CPUs, {} memory",
                facts.cpus,
                size(facts.memory_bytes)
            )),
        ]),
        Line::from(match &facts.no_virtualization {
            None => "Hardware virtualisation: available (KVM)".to_string(),
            Some(why) => format!("Hardware virtualisation: no - {why}"),
        }),
    ];
    let interfaces: Vec<String> = facts
        .interfaces
        .iter()
        .filter(|i| i.name != "lo" && i.up)
        .take(2)
        .map(|i| {
            format!(
                "{} {} mtu {} {}",
                i.name,
                if i.up { "up" } else { "down" },
                i.mtu,
                i.addresses
                    .iter()
                    .find(|a| !a.contains(':'))
                    .cloned()
                    .unwrap_or_else(|| "-".into())
            )
        })
        .collect();
    lines.push(Line::from(format!("Network: {}", interfaces.join("; "))));
    let disks: Vec<String> = facts
        .disks
        .iter()
        .take(4)
        .map(|d| format!("{} {}", d.name, size(d.size_bytes)))
        .collect();
    lines.push(Line::from(format!("Disks: {}", disks.join(", "))));
    lines
}

fn agent_line(app: &App) -> Line<'static> {
    let status = &app.status;
    Line::from(if !status.reachable {
        format!(
            "Agent: not reachable ({}); start it with `allod agent --data-dir DIR`",
            status.error.as_deref().unwrap_or("no answer")
        )
    } else if status.configured && !status.cluster_name.is_empty() {
        format!(
            "Agent: running, node {} of cluster {} ({})",
            status.node_id, status.cluster_name, status.cluster_id
        )
    } else if status.configured {
        format!(
            "Agent: running, node {} of cluster {}",
            status.node_id, status.cluster_id
        )
    } else {
        "Agent: running, not part of a cluster yet".to_string()
    })
}

fn welcome(app: &App, selected: Choice) -> (&'static str, Vec<Line<'static>>, &'static str) {
    let mut lines = identity(app);
    lines.push(agent_line(app));
    lines.push(Line::from(""));
    for (choice, text) in [
        (Choice::Create, "Create a new cluster"),
        (Choice::Join, "Join an existing cluster"),
        (Choice::Setup, "Set up this node (network, time, disks)"),
    ] {
        lines.push(if choice == selected {
            Line::from(Span::styled(
                format!("> {text}"),
                Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD),
            ))
        } else {
            Line::from(format!("  {text}"))
        });
    }
    (
        "Allod node setup",
        lines,
        "Up/Down choose, Enter select, C create, J join, S set up, Ctrl-C leave the console",
    )
}

fn setup_form(
    app: &App,
    form: &SetupForm,
    cursor: usize,
) -> (&'static str, Vec<Line<'static>>, &'static str) {
    let interfaces: Vec<String> = app
        .facts
        .as_ref()
        .map(|f| f.interfaces.iter().map(|i| i.name.clone()).collect())
        .unwrap_or_default();
    let disks: Vec<String> = app
        .facts
        .as_ref()
        .map(|f| {
            f.disks
                .iter()
                .map(|d| format!("/dev/{} {}", d.name, size(d.size_bytes)))
                .collect()
        })
        .unwrap_or_default();
    let mut lines = vec![
        Line::from("Nothing changes until Apply; the agent checks the whole setup first."),
        Line::from(format!("Interfaces: {}", interfaces.join(" "))),
        Line::from(format!("Disks: {}", disks.join(", "))),
        Line::from(""),
    ];
    let addressing = if form.dhcp { "DHCP" } else { "static" }.to_string();
    let values = [
        form.hostname.clone(),
        form.interface.clone(),
        addressing,
        form.address.clone(),
        form.gateway.clone(),
        form.dns.clone(),
        form.ntp.clone(),
        form.disks.clone(),
        form.wipe.clone(),
        String::new(),
    ];
    for (row, (label, value)) in SETUP_ROWS.iter().zip(values).enumerate() {
        let text = if row == SETUP_ROWS.len() - 1 {
            "[ Apply ]".to_string()
        } else {
            let shown = if row == cursor && row != 2 {
                format!("{value}_")
            } else {
                value
            };
            format!("{label:<15} {shown}")
        };
        lines.push(if row == cursor {
            Line::from(Span::styled(
                format!("> {text}"),
                Style::default().add_modifier(Modifier::REVERSED),
            ))
        } else {
            Line::from(format!("  {text}"))
        });
    }
    lines.push(Line::from(""));
    lines.push(Line::from(
        "A disk with data on it is used only if it is also listed under Wipe disks.",
    ));
    (
        "Set up this node",
        lines,
        "Up/Down field, type to edit, Space DHCP/static, Enter on Apply, Esc back",
    )
}

fn preflight(checks: &[Check]) -> (&'static str, Vec<Line<'static>>, &'static str) {
    if checks.is_empty() {
        return (
            "Pre-flight checks",
            vec![Line::from(
                "Running the checks; nothing is changed on this node...",
            )],
            "Please wait, Esc back",
        );
    }
    let mut lines = Vec::new();
    for check in checks {
        let mark = match check.verdict {
            Verdict::Pass => "[ ok ]",
            Verdict::Warn => "[warn]",
            Verdict::Fail => "[FAIL]",
        };
        lines.push(Line::from(vec![
            bold(mark),
            Span::raw(format!(" {}: {}", check.name, check.detail)),
        ]));
        if check.verdict != Verdict::Pass && !check.fix.is_empty() {
            lines.push(Line::from(format!("       fix: {}", check.fix)));
        }
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    lines.push(Line::from(""));
    if failed == 0 {
        lines.push(Line::from(bold("All checks passed. Press J to join.")));
        ("Pre-flight checks", lines, "J join, R run again, Esc back")
    } else {
        lines.push(Line::from(bold(format!(
            "{failed} check(s) failed: the node was not changed. Fix them and press R."
        ))));
        ("Pre-flight checks", lines, "R run again, Esc back")
    }
}

fn dashboard(app: &App) -> (&'static str, Vec<Line<'static>>, &'static str) {
    let mut lines = identity(app);
    lines.push(agent_line(app));
    let status = &app.status;
    if !status.ca_fingerprint.is_empty() {
        let rows = fingerprint_rows(&status.ca_fingerprint);
        for (i, row) in rows.iter().enumerate() {
            let label = if i == 0 {
                "Cluster CA SHA-256: "
            } else {
                "                    "
            };
            lines.push(Line::from(format!("{label}{row}")));
        }
    }
    if !status.storage.is_empty() {
        lines.push(Line::from(format!("Storage: {}", status.storage)));
    }
    lines.push(Line::from(bold(format!(
        "Members ({}), leader: {}",
        status.members.len(),
        status
            .leader_id
            .map_or("none known".to_string(), |l| format!("node {l}"))
    ))));
    let leading = status.leader_id == Some(status.node_id);
    for member in status.members.iter().take(5) {
        let health = if Some(member.id) == status.leader_id {
            "leader".to_string()
        } else if !leading {
            "-".to_string()
        } else {
            match member.lag {
                Some(0) => "in sync".to_string(),
                Some(n) => format!("{n} behind"),
                None => "not answering".to_string(),
            }
        };
        lines.push(Line::from(format!(
            "  {:<3} {:<16} {:<8} {:<22} {}",
            member.id, member.name, member.role, member.peer_addr, health
        )));
    }
    let used_vcpus: u64 = status.vms.iter().map(|v| v.vcpus).sum();
    let used_memory: u64 = status.vms.iter().map(|v| v.memory_bytes).sum();
    lines.push(Line::from(format!(
        "This node: {} VM(s), {used_vcpus} of {} vCPUs, {} of {} memory{}",
        status.vms.len(),
        status.vcpus,
        size(used_memory),
        size(status.memory_bytes),
        if status.maintenance {
            "  [MAINTENANCE]"
        } else {
            ""
        }
    )));
    for vm in status.vms.iter().take(3) {
        lines.push(Line::from(format!(
            "  {}/{} {} vCPU {} {}",
            vm.project,
            vm.name,
            vm.vcpus,
            size(vm.memory_bytes),
            vm.state
        )));
    }
    if status.vms.len() > 3 {
        lines.push(Line::from(format!(
            "  ... and {} more",
            status.vms.len() - 3
        )));
    }
    let recent: Vec<&String> = app.log_tail.iter().rev().take(2).collect();
    if !recent.is_empty() {
        lines.push(Line::from(bold("Recent on this console")));
        for line in recent.into_iter().rev() {
            lines.push(Line::from(format!("  {line}")));
        }
    }
    if !status.log_tail.is_empty() {
        lines.push(Line::from(bold("Agent log")));
        for line in status.log_tail.iter().rev().take(3).rev() {
            // The timestamp's date is noise on a console.
            let line = line.get(11..).unwrap_or(line);
            lines.push(Line::from(format!("  {}", shorten_end(line, 74))));
        }
    }
    (
        "Allod node dashboard",
        lines,
        "T join token, M maintenance, L leave the cluster, Ctrl-C leave the console",
    )
}

/// The screen as text, for tests and for a terminal-less dump.
pub fn render_to_text(app: &App, width: u16, height: u16) -> String {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let mut terminal = ratatui::Terminal::new(backend).expect("a test backend never fails");
    terminal
        .draw(|frame| render(frame, app))
        .expect("drawing to a test backend never fails");
    let buffer = terminal.backend().buffer().clone();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        let mut row = String::new();
        for x in 0..buffer.area.width {
            row.push_str(buffer[(x, y)].symbol());
        }
        text.push_str(row.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::app::{AgentStatus, Event, LocalVm, Member};
    use super::super::facts::{Disk, Interface, NodeFacts};
    use super::*;
    use crate::cluster::join::{JoinToken, TokenMember};

    fn facts() -> NodeFacts {
        NodeFacts {
            hostname: "rack1-node7".into(),
            cpus: 64,
            cpu_model: "Example CPU".into(),
            memory_bytes: 512 << 30,
            no_virtualization: None,
            interfaces: vec![
                Interface {
                    name: "eno1".into(),
                    up: true,
                    mtu: 9000,
                    addresses: vec!["10.0.0.7".into(), "fe80::1".into()],
                },
                Interface {
                    name: "eno2".into(),
                    up: false,
                    mtu: 1500,
                    addresses: vec![],
                },
            ],
            disks: vec![
                Disk {
                    name: "nvme0n1".into(),
                    size_bytes: 3840 << 30,
                    model: "NVMe".into(),
                },
                Disk {
                    name: "sda".into(),
                    size_bytes: 480 << 30,
                    model: "SSD".into(),
                },
            ],
        }
    }

    fn token() -> JoinToken {
        JoinToken {
            cluster_id: "9f2c4e1a7b3d5c60".into(),
            ca_fingerprint: "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b"
                .into(),
            members: vec![
                TokenMember {
                    name: "rack1-node1".into(),
                    api_addr: "10.0.0.1:7443".into(),
                    peer_addr: "10.0.0.1:7444".into(),
                },
                TokenMember {
                    name: "rack1-node2".into(),
                    api_addr: "10.0.0.2:7443".into(),
                    peer_addr: "10.0.0.2:7444".into(),
                },
            ],
            id: "0011223344556677".into(),
            secret: "secret".into(),
            expires_at_ms: 4_102_444_800_000,
        }
    }

    fn app(screen: Screen) -> App {
        let mut app = App::new();
        app.on_event(Event::Facts(facts()));
        app.status = AgentStatus {
            reachable: true,
            ..AgentStatus::default()
        };
        app.screen = screen;
        app
    }

    fn configured(screen: Screen) -> App {
        let mut app = app(screen);
        app.status = AgentStatus {
            reachable: true,
            configured: true,
            cluster_id: "9f2c4e1a7b3d5c60".into(),
            cluster_name: "prod".into(),
            node_id: 2,
            leader_id: Some(1),
            ca_fingerprint: token().ca_fingerprint,
            members: (1..=3)
                .map(|id| Member {
                    id,
                    name: format!("rack1-node{id}"),
                    role: if id < 3 { "voter" } else { "learner" }.into(),
                    peer_addr: format!("10.0.0.{id}:7444"),
                    lag: None,
                })
                .collect(),
            maintenance: false,
            storage: "recovering, 1.2 GiB left at 80 MiB/s, ~16 s (rack1-node3 out)".into(),
            vcpus: 64,
            memory_bytes: 512 << 30,
            vms: ["web1", "web2", "db1", "db2"]
                .iter()
                .map(|name| LocalVm {
                    project: "shop".into(),
                    name: name.to_string(),
                    vcpus: 2,
                    memory_bytes: 4 << 30,
                    state: "pending".into(),
                })
                .collect(),
            log_tail: vec![
                "2026-11-26T05:31:02.113Z  INFO agent::daemon: joined the cluster node_id=2".into(),
                "2026-11-26T05:31:05.400Z  INFO agent::daemon: recorded this node's capacity vcpus=64 memory_bytes=549755813888".into(),
            ],
            error: None,
        };
        app
    }

    fn check(name: &str, verdict: Verdict, detail: &str, fix: &str) -> Check {
        Check {
            name: name.into(),
            verdict,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn snapshot(name: &str, app: &App) {
        insta::assert_snapshot!(name, render_to_text(app, 80, 24));
    }

    #[test]
    fn welcome_offers_both_choices() {
        let text = render_to_text(
            &app(Screen::Welcome {
                selected: Choice::Create,
            }),
            80,
            24,
        );
        assert!(text.contains("Create a new cluster") && text.contains("Join an existing cluster"));
        snapshot(
            "welcome",
            &app(Screen::Welcome {
                selected: Choice::Join,
            }),
        );
        let mut unreachable = app(Screen::Welcome {
            selected: Choice::Create,
        });
        unreachable.status = AgentStatus {
            reachable: false,
            error: Some("no agent is running with data directory /var/lib/allod".into()),
            ..AgentStatus::default()
        };
        snapshot("welcome_agent_down", &unreachable);
    }

    #[test]
    fn setup_screens() {
        snapshot(
            "create_name",
            &app(Screen::CreateName {
                name: "prod".into(),
            }),
        );
        snapshot(
            "token_entry_error",
            &app(Screen::TokenEntry {
                text: "eyJjbHVzdGVyX2lk".into(),
                error: Some("the join token is malformed: its contents do not parse (EOF); it was probably truncated or edited, copy it again in full".into()),
            }),
        );
        snapshot(
            "confirm_fingerprint",
            &app(Screen::ConfirmFingerprint {
                raw: String::new(),
                token: token(),
            }),
        );
    }

    #[test]
    fn setup_form_screen() {
        let form = SetupForm {
            hostname: "rack1-node7".into(),
            interface: "eno1".into(),
            dhcp: false,
            address: "10.0.0.7/24".into(),
            gateway: "10.0.0.1".into(),
            dns: "10.0.0.1".into(),
            ntp: "ntp1.example.org".into(),
            disks: "/dev/nvme0n1".into(),
            wipe: String::new(),
        };
        snapshot("setup_form", &app(Screen::Setup { form, cursor: 3 }));
        snapshot(
            "setup_failed",
            &app(Screen::Working {
                title: "Setting up this node".into(),
                steps: vec![],
                outcome: Some(Err("/dev/nvme0n1 holds data (partitions or a file system); to erase it, list it to wipe too (--wipe /dev/nvme0n1)".into())),
            }),
        );
    }

    #[test]
    fn preflight_screens() {
        let running = Screen::Preflight {
            raw: String::new(),
            token: token(),
            checks: Vec::new(),
        };
        snapshot("preflight_running", &app(running));
        let passed = vec![
            check(
                "Join token still valid",
                Verdict::Pass,
                "expires in 59 min",
                "",
            ),
            check(
                "Member rack1-node1 reachable (10.0.0.1:7444)",
                Verdict::Pass,
                "peer port answers",
                "",
            ),
            check(
                "Cluster CA matches the token",
                Verdict::Pass,
                "SHA-256 3a7bd3e2360a3d29...",
                "",
            ),
            check(
                "Clock within 500 ms of the cluster",
                Verdict::Pass,
                "+3 ms",
                "",
            ),
            check(
                "MTU large enough for VXLAN",
                Verdict::Pass,
                "eno1 has MTU 9000",
                "",
            ),
            check(
                "libvirt answering",
                Verdict::Warn,
                "libvirtd is not running",
                "start libvirtd (and virtlogd)",
            ),
        ];
        snapshot(
            "preflight_passed",
            &app(Screen::Preflight {
                raw: String::new(),
                token: token(),
                checks: passed,
            }),
        );
        let failed = vec![
            check(
                "Join token still valid",
                Verdict::Fail,
                "the token expired 120 s ago",
                "create a new one with `allod cluster join-token` on a member",
            ),
            check(
                "Member rack1-node1 reachable (10.0.0.1:7444)",
                Verdict::Fail,
                "cannot connect: Connection refused (os error 111)",
                "check the address, routing and firewalls between the nodes",
            ),
            check(
                "Cluster CA matches the token",
                Verdict::Fail,
                "the member presents CA 11aa..., the token names 3a7b...",
                "get a new token from a member you trust",
            ),
            check(
                "MTU large enough for VXLAN",
                Verdict::Fail,
                "eno1 has MTU 1500; overlays need 1550",
                "raise the MTU of the management network",
            ),
        ];
        snapshot(
            "preflight_failed",
            &app(Screen::Preflight {
                raw: String::new(),
                token: token(),
                checks: failed,
            }),
        );
    }

    #[test]
    fn progress_screens() {
        let steps = vec![
            "Token for cluster 9f2c4e1a7b3d5c60".to_string(),
            "10.0.0.1:7443 presents the expected CA certificate".to_string(),
            "Asking the leader to add this node as a learner and catch it up".to_string(),
        ];
        let working = |outcome| Screen::Working {
            title: "Joining the cluster".into(),
            steps: steps.clone(),
            outcome,
        };
        snapshot("join_running", &app(working(None)));
        snapshot(
            "join_failed",
            &app(working(Some(Err(
                "the join token was already used; create a new one with `allod cluster join-token`"
                    .into(),
            )))),
        );
        snapshot(
            "join_done",
            &app(working(Some(Ok("Done: this node is node 2 of cluster 9f2c4e1a7b3d5c60. Press Enter for the dashboard.".into())))),
        );
    }

    #[test]
    fn dashboard_screens() {
        let mut dashboard = configured(Screen::Dashboard);
        dashboard.log_tail = vec!["Created a join token".into()];
        snapshot("dashboard", &dashboard);
        snapshot(
            "confirm_leave",
            &configured(Screen::Confirming(Confirm::Leave)),
        );
        snapshot(
            "confirm_join_token",
            &configured(Screen::Confirming(Confirm::JoinToken)),
        );
        snapshot(
            "show_token",
            &configured(Screen::ShowToken {
                token: token().encode(),
            }),
        );
        let mut leader = configured(Screen::Dashboard);
        leader.status.node_id = 1;
        leader.status.members[1].lag = Some(0);
        leader.status.members[2].lag = Some(42);
        leader.status.vms.clear();
        snapshot("dashboard_leader", &leader);
        let mut maintenance = configured(Screen::Dashboard);
        maintenance.status.maintenance = true;
        snapshot("dashboard_maintenance", &maintenance);
        snapshot(
            "confirm_maintenance",
            &configured(Screen::Confirming(Confirm::Maintenance { on: true })),
        );
        let mut note = configured(Screen::Dashboard);
        note.note =
            Some("cannot remove node 2: it is the leader; remove it from another node".into());
        snapshot("dashboard_error", &note);
    }

    #[test]
    fn larger_terminals_work_too() {
        let text = render_to_text(&configured(Screen::Dashboard), 120, 40);
        assert!(text.contains("Members (3), leader: node 1"));
        assert_eq!(text.lines().count(), 40);
    }
}
