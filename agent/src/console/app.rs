//! The console's state machine: keys and results in, screens and effects
//! out. No I/O here, so every flow is tested without a terminal.

use crate::cluster::join::JoinToken;

/// A key press, as the console understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Up,
    Down,
    /// Ctrl-C: leave the console (the agent keeps running).
    Interrupt,
}

/// Work the runtime does for the state machine; its results come back as
/// [`Event`]s.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    CreateCluster {
        name: Option<String>,
    },
    RunPreflight {
        token: JoinToken,
    },
    Join {
        token: String,
    },
    CreateJoinToken,
    Leave,
    Maintenance {
        on: bool,
    },
    Setup {
        setup: crate::daemon::setup::NodeSetup,
        wipe: Vec<String>,
    },
    Quit,
}

/// One pre-flight check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    /// What was seen, or what is wrong.
    pub detail: String,
    /// What to do about a failure or warning.
    pub fix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Worth knowing; does not stop the join.
    Warn,
    Fail,
}

/// What the runtime reports back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Facts(super::facts::NodeFacts),
    Status(AgentStatus),
    PreflightDone(Vec<Check>),
    Progress(String),
    Done(serde_json::Value),
    Failed(String),
    JoinToken(String),
    /// Something worth telling the operator.
    Note(String),
}

/// The local agent as its admin socket describes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentStatus {
    pub reachable: bool,
    pub configured: bool,
    pub cluster_id: String,
    pub cluster_name: String,
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub ca_fingerprint: String,
    pub members: Vec<Member>,
    pub maintenance: bool,
    /// This node's capacity.
    pub vcpus: u64,
    pub memory_bytes: u64,
    /// The VMs placed on this node.
    pub vms: Vec<LocalVm>,
    /// The storage cluster's health line (`ok`, `degraded`, `recovering`
    /// with what is left to copy).
    pub storage: String,
    /// The agent's newest log lines.
    pub log_tail: Vec<String>,
    /// When the admin socket cannot be reached, why.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub role: String,
    pub peer_addr: String,
    /// Entries behind the leader, as the leader sees it (`None`: unknown
    /// here, or not heard from).
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVm {
    pub project: String,
    pub name: String,
    pub vcpus: u64,
    pub memory_bytes: u64,
    pub state: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Create,
    Join,
    Setup,
}

/// The node-setup form, field by field, as typed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetupForm {
    pub hostname: String,
    pub interface: String,
    pub dhcp: bool,
    pub address: String,
    pub gateway: String,
    pub dns: String,
    pub ntp: String,
    pub disks: String,
    pub wipe: String,
}

/// The form's rows: its fields, then "Apply".
pub const SETUP_ROWS: [&str; 10] = [
    "Host name",
    "Interface",
    "Addressing",
    "Address/prefix",
    "Gateway",
    "DNS servers",
    "NTP servers",
    "Storage disks",
    "Wipe disks",
    "Apply",
];

fn list(text: &str) -> Vec<String> {
    text.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl SetupForm {
    fn field(&mut self, row: usize) -> Option<&mut String> {
        Some(match row {
            0 => &mut self.hostname,
            1 => &mut self.interface,
            3 => &mut self.address,
            4 => &mut self.gateway,
            5 => &mut self.dns,
            6 => &mut self.ntp,
            7 => &mut self.disks,
            8 => &mut self.wipe,
            _ => return None,
        })
    }

    /// The setup the agent is asked for (it validates it as a whole).
    pub fn to_setup(&self) -> (crate::daemon::setup::NodeSetup, Vec<String>) {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let setup = crate::daemon::setup::NodeSetup {
            hostname: some(&self.hostname),
            management: some(&self.interface).map(|interface| crate::daemon::setup::Management {
                interface,
                dhcp: self.dhcp,
                address: if self.dhcp { None } else { some(&self.address) },
                gateway: if self.dhcp { None } else { some(&self.gateway) },
                dns: list(&self.dns),
            }),
            ntp: list(&self.ntp),
            storage_disks: list(&self.disks),
        };
        (setup, list(&self.wipe))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    JoinToken,
    Leave,
    Maintenance { on: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    /// Unconfigured node: identity and the two choices.
    Welcome {
        selected: Choice,
    },
    /// The cluster's name, then Enter to create it.
    CreateName {
        name: String,
    },
    /// Paste or type the join token.
    TokenEntry {
        text: String,
        error: Option<String>,
    },
    /// The CA fingerprint from the token, to compare with a member's.
    ConfirmFingerprint {
        raw: String,
        token: JoinToken,
    },
    /// Pre-flight checks running (`checks` empty) or done.
    Preflight {
        raw: String,
        token: JoinToken,
        checks: Vec<Check>,
    },
    /// The node's own setup, row `cursor` selected.
    Setup {
        form: SetupForm,
        cursor: usize,
    },
    /// Creating or joining: steps so far, and how it ended.
    Working {
        title: String,
        steps: Vec<String>,
        outcome: Option<Result<String, String>>,
    },
    Dashboard,
    Confirming(Confirm),
    ShowToken {
        token: String,
    },
}

pub struct App {
    pub screen: Screen,
    pub facts: Option<super::facts::NodeFacts>,
    pub status: AgentStatus,
    /// What happened through this console, newest last.
    pub log_tail: Vec<String>,
    /// A one-line note for the operator (results, refusals).
    pub note: Option<String>,
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    pub fn new() -> Self {
        Self {
            screen: Screen::Welcome {
                selected: Choice::Create,
            },
            facts: None,
            status: AgentStatus::default(),
            log_tail: Vec::new(),
            note: None,
        }
    }

    /// Applies a key; returns the work it asks for, if any.
    pub fn on_key(&mut self, key: Key) -> Option<Effect> {
        if key == Key::Interrupt {
            return Some(Effect::Quit);
        }
        let screen = std::mem::replace(&mut self.screen, Screen::Dashboard);
        let (next, effect) = self.step(screen, key);
        self.screen = next;
        effect
    }

    fn home(&self) -> Screen {
        if self.status.configured {
            Screen::Dashboard
        } else {
            Screen::Welcome {
                selected: Choice::Create,
            }
        }
    }

    fn step(&mut self, screen: Screen, key: Key) -> (Screen, Option<Effect>) {
        match (screen, key) {
            (Screen::Welcome { selected }, Key::Down) => (
                Screen::Welcome {
                    selected: match selected {
                        Choice::Create => Choice::Join,
                        Choice::Join => Choice::Setup,
                        Choice::Setup => Choice::Create,
                    },
                },
                None,
            ),
            (Screen::Welcome { selected }, Key::Up) => (
                Screen::Welcome {
                    selected: match selected {
                        Choice::Create => Choice::Setup,
                        Choice::Join => Choice::Create,
                        Choice::Setup => Choice::Join,
                    },
                },
                None,
            ),
            (Screen::Welcome { .. }, Key::Char('s' | 'S')) => (
                Screen::Setup {
                    form: SetupForm::default(),
                    cursor: 0,
                },
                None,
            ),
            (Screen::Welcome { .. }, Key::Char('c' | 'C')) => (
                Screen::CreateName {
                    name: String::new(),
                },
                None,
            ),
            (Screen::Welcome { .. }, Key::Char('j' | 'J')) => (
                Screen::TokenEntry {
                    text: String::new(),
                    error: None,
                },
                None,
            ),
            (Screen::Welcome { selected }, Key::Enter) => match selected {
                Choice::Create => (
                    Screen::CreateName {
                        name: String::new(),
                    },
                    None,
                ),
                Choice::Join => (
                    Screen::TokenEntry {
                        text: String::new(),
                        error: None,
                    },
                    None,
                ),
                Choice::Setup => (
                    Screen::Setup {
                        form: SetupForm::default(),
                        cursor: 0,
                    },
                    None,
                ),
            },

            (Screen::Setup { form, cursor }, Key::Down) => (
                Screen::Setup {
                    form,
                    cursor: (cursor + 1) % SETUP_ROWS.len(),
                },
                None,
            ),
            (Screen::Setup { form, cursor }, Key::Up) => (
                Screen::Setup {
                    form,
                    cursor: (cursor + SETUP_ROWS.len() - 1) % SETUP_ROWS.len(),
                },
                None,
            ),
            (
                Screen::Setup {
                    mut form,
                    cursor: 2,
                },
                Key::Char(' '),
            ) => {
                form.dhcp = !form.dhcp;
                (Screen::Setup { form, cursor: 2 }, None)
            }
            (Screen::Setup { mut form, cursor }, Key::Char(c)) => {
                if let Some(field) = form.field(cursor) {
                    if field.len() < 200 {
                        field.push(c);
                    }
                }
                (Screen::Setup { form, cursor }, None)
            }
            (Screen::Setup { mut form, cursor }, Key::Backspace) => {
                if let Some(field) = form.field(cursor) {
                    field.pop();
                }
                (Screen::Setup { form, cursor }, None)
            }
            (Screen::Setup { form, cursor }, Key::Enter) if cursor == SETUP_ROWS.len() - 1 => {
                let (setup, wipe) = form.to_setup();
                (
                    Screen::Working {
                        title: "Setting up this node".into(),
                        steps: Vec::new(),
                        outcome: None,
                    },
                    Some(Effect::Setup { setup, wipe }),
                )
            }
            (Screen::Setup { form, cursor }, Key::Enter) => (
                Screen::Setup {
                    form,
                    cursor: cursor + 1,
                },
                None,
            ),
            (Screen::Welcome { .. }, Key::Char('q' | 'Q')) => (self.home(), Some(Effect::Quit)),

            (Screen::CreateName { mut name }, Key::Char(c)) => {
                if (c.is_ascii_alphanumeric() || c == '-') && name.len() < 63 {
                    name.push(c.to_ascii_lowercase());
                }
                (Screen::CreateName { name }, None)
            }
            (Screen::CreateName { mut name }, Key::Backspace) => {
                name.pop();
                (Screen::CreateName { name }, None)
            }
            (Screen::CreateName { name }, Key::Enter) => (
                Screen::Working {
                    title: "Creating a new cluster".into(),
                    steps: Vec::new(),
                    outcome: None,
                },
                Some(Effect::CreateCluster {
                    name: (!name.is_empty()).then_some(name),
                }),
            ),

            (Screen::TokenEntry { mut text, .. }, Key::Char(c)) => {
                if !c.is_whitespace() {
                    text.push(c);
                }
                (Screen::TokenEntry { text, error: None }, None)
            }
            (Screen::TokenEntry { mut text, .. }, Key::Backspace) => {
                text.pop();
                (Screen::TokenEntry { text, error: None }, None)
            }
            (Screen::TokenEntry { text, .. }, Key::Enter) => {
                // Expiry is a pre-flight check; here only the shape counts.
                match JoinToken::decode(&text, 0) {
                    Ok(token) => (Screen::ConfirmFingerprint { raw: text, token }, None),
                    Err(e) => (
                        Screen::TokenEntry {
                            text,
                            error: Some(e.to_string()),
                        },
                        None,
                    ),
                }
            }

            (Screen::ConfirmFingerprint { raw, token }, Key::Char('y' | 'Y') | Key::Enter) => (
                Screen::Preflight {
                    raw,
                    token: token.clone(),
                    checks: Vec::new(),
                },
                Some(Effect::RunPreflight { token }),
            ),
            (Screen::ConfirmFingerprint { raw, .. }, Key::Char('n' | 'N')) => (
                Screen::TokenEntry {
                    text: raw,
                    error: Some(
                        "fingerprint not confirmed: check the token came from this cluster".into(),
                    ),
                },
                None,
            ),

            (Screen::Preflight { raw, checks, .. }, Key::Char('j' | 'J') | Key::Enter)
                if !checks.is_empty() && !checks.iter().any(|c| c.verdict == Verdict::Fail) =>
            {
                (
                    Screen::Working {
                        title: "Joining the cluster".into(),
                        steps: Vec::new(),
                        outcome: None,
                    },
                    Some(Effect::Join { token: raw }),
                )
            }
            (Screen::Preflight { token, raw, checks }, Key::Char('r' | 'R'))
                if !checks.is_empty() =>
            {
                (
                    Screen::Preflight {
                        raw,
                        token: token.clone(),
                        checks: Vec::new(),
                    },
                    Some(Effect::RunPreflight { token }),
                )
            }

            (
                Screen::Working {
                    outcome: Some(_), ..
                },
                Key::Enter | Key::Esc,
            ) => (self.home(), None),

            (Screen::Dashboard, Key::Char('t' | 'T')) => {
                (Screen::Confirming(Confirm::JoinToken), None)
            }
            (Screen::Dashboard, Key::Char('l' | 'L')) => (Screen::Confirming(Confirm::Leave), None),
            (Screen::Dashboard, Key::Char('m' | 'M')) => (
                Screen::Confirming(Confirm::Maintenance {
                    on: !self.status.maintenance,
                }),
                None,
            ),
            (Screen::Dashboard, Key::Char('q' | 'Q')) => (Screen::Dashboard, Some(Effect::Quit)),
            (Screen::Confirming(what), Key::Char('y' | 'Y')) => {
                let effect = match what {
                    Confirm::JoinToken => Effect::CreateJoinToken,
                    Confirm::Leave => Effect::Leave,
                    Confirm::Maintenance { on } => Effect::Maintenance { on },
                };
                (Screen::Dashboard, Some(effect))
            }
            (Screen::Confirming(_), Key::Char('n' | 'N') | Key::Esc) => (Screen::Dashboard, None),
            (Screen::ShowToken { .. }, Key::Enter | Key::Esc) => (Screen::Dashboard, None),

            // Esc steps back without changing anything, from every step of
            // the setup flows (a running operation cannot be cancelled).
            (
                Screen::CreateName { .. }
                | Screen::Setup { .. }
                | Screen::TokenEntry { .. }
                | Screen::ConfirmFingerprint { .. }
                | Screen::Preflight { .. },
                Key::Esc,
            ) => (self.home(), None),

            (screen, _) => (screen, None),
        }
    }

    /// Applies a result from the runtime.
    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::Facts(facts) => self.facts = Some(facts),
            Event::Status(status) => {
                let became_configured = status.configured && !self.status.configured;
                self.status = status;
                if became_configured && matches!(self.screen, Screen::Welcome { .. }) {
                    self.screen = Screen::Dashboard;
                }
            }
            Event::PreflightDone(checks) => {
                if let Screen::Preflight { checks: slot, .. } = &mut self.screen {
                    *slot = checks;
                }
            }
            Event::Progress(step) => {
                if let Screen::Working { steps, .. } = &mut self.screen {
                    steps.push(step);
                }
            }
            Event::Done(result) => {
                self.log_tail.push(match result.get("node_id") {
                    Some(id) => format!("This node became node {id}"),
                    None => "Done".into(),
                });
                if let Screen::Working { outcome, .. } = &mut self.screen {
                    let summary = match result.get("node_id") {
                        Some(id) => format!(
                            "Done: this node is node {id} of cluster {}. Press Enter for the dashboard.",
                            result["cluster_id"].as_str().unwrap_or("?")
                        ),
                        None => "Done. Press Enter.".to_string(),
                    };
                    *outcome = Some(Ok(summary));
                } else {
                    self.note = Some("Done.".into());
                }
            }
            Event::Failed(message) => {
                self.log_tail.push(format!("Failed: {message}"));
                if let Screen::Working { outcome, .. } = &mut self.screen {
                    *outcome = Some(Err(message));
                } else {
                    self.note = Some(message);
                }
            }
            Event::Note(note) => {
                self.log_tail.push(note.clone());
                self.note = Some(note);
            }
            Event::JoinToken(token) => {
                self.log_tail.push("Created a join token".into());
                self.screen = Screen::ShowToken { token };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> (String, JoinToken) {
        let token = JoinToken {
            cluster_id: "c0ffee".into(),
            ca_fingerprint: "ab".repeat(32),
            members: vec![crate::cluster::join::TokenMember {
                name: "node-1".into(),
                api_addr: "127.0.0.1:7443".into(),
                peer_addr: "127.0.0.1:7444".into(),
            }],
            id: "t1".into(),
            secret: "s".into(),
            expires_at_ms: u64::MAX,
        };
        (token.encode(), token)
    }

    fn typed(app: &mut App, text: &str) {
        for c in text.chars() {
            assert_eq!(app.on_key(Key::Char(c)), None);
        }
    }

    fn check(verdict: Verdict) -> Check {
        Check {
            name: "x".into(),
            verdict,
            detail: String::new(),
            fix: String::new(),
        }
    }

    #[test]
    fn create_flow_names_the_cluster_and_asks_the_agent() {
        let mut app = App::new();
        assert_eq!(app.on_key(Key::Enter), None);
        assert!(matches!(app.screen, Screen::CreateName { .. }));
        typed(&mut app, "Prod 1");
        assert_eq!(
            app.on_key(Key::Enter),
            Some(Effect::CreateCluster {
                name: Some("prod1".into())
            })
        );
        app.on_event(Event::Progress("Creating the CA".into()));
        app.on_event(Event::Done(
            serde_json::json!({ "node_id": 1, "cluster_id": "c0ffee" }),
        ));
        let Screen::Working { steps, outcome, .. } = &app.screen else {
            panic!("{:?}", app.screen)
        };
        assert_eq!(steps.len(), 1);
        assert!(outcome
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap()
            .contains("node 1"));
        app.status.configured = true;
        app.on_key(Key::Enter);
        assert_eq!(app.screen, Screen::Dashboard);
    }

    #[test]
    fn join_flow_confirms_the_fingerprint_and_joins_only_after_clean_checks() {
        let (raw, parsed) = token();
        let mut app = App::new();
        app.on_key(Key::Down);
        assert_eq!(
            app.screen,
            Screen::Welcome {
                selected: Choice::Join
            }
        );
        app.on_key(Key::Enter);
        typed(&mut app, &raw);
        assert_eq!(app.on_key(Key::Enter), None);
        assert!(matches!(app.screen, Screen::ConfirmFingerprint { .. }));
        assert_eq!(
            app.on_key(Key::Char('y')),
            Some(Effect::RunPreflight {
                token: parsed.clone()
            })
        );
        // Enter does nothing while checks run.
        assert_eq!(app.on_key(Key::Enter), None);
        app.on_event(Event::PreflightDone(vec![
            check(Verdict::Pass),
            check(Verdict::Fail),
        ]));
        assert_eq!(
            app.on_key(Key::Enter),
            None,
            "a failed check blocks the join"
        );
        assert_eq!(
            app.on_key(Key::Char('r')),
            Some(Effect::RunPreflight {
                token: parsed.clone()
            })
        );
        app.on_event(Event::PreflightDone(vec![
            check(Verdict::Pass),
            check(Verdict::Warn),
        ]));
        assert_eq!(
            app.on_key(Key::Enter),
            Some(Effect::Join { token: raw.clone() })
        );
        app.on_event(Event::Failed("the token was already used".into()));
        let Screen::Working { outcome, .. } = &app.screen else {
            panic!()
        };
        assert_eq!(
            outcome.clone().unwrap().unwrap_err(),
            "the token was already used"
        );
        app.on_key(Key::Enter);
        assert!(
            matches!(app.screen, Screen::Welcome { .. }),
            "still unconfigured, retryable"
        );
    }

    #[test]
    fn setup_form_asks_the_agent_for_the_whole_setup() {
        let mut app = App::new();
        app.on_key(Key::Char('s'));
        typed(&mut app, "node7");
        app.on_key(Key::Down);
        typed(&mut app, "eno1");
        app.on_key(Key::Down);
        app.on_key(Key::Char(' '));
        app.on_key(Key::Char(' '));
        app.on_key(Key::Enter);
        typed(&mut app, "10.0.0.7/24");
        app.on_key(Key::Down);
        typed(&mut app, "10.0.0.1");
        app.on_key(Key::Down);
        typed(&mut app, "10.0.0.1, 9.9.9.9");
        app.on_key(Key::Down);
        app.on_key(Key::Down);
        typed(&mut app, "/dev/sdb /dev/sdc");
        app.on_key(Key::Down);
        typed(&mut app, "/dev/sdc");
        app.on_key(Key::Up);
        app.on_key(Key::Down);
        app.on_key(Key::Down);
        let Some(Effect::Setup { setup, wipe }) = app.on_key(Key::Enter) else {
            panic!("{:?}", app.screen)
        };
        assert_eq!(setup.hostname.as_deref(), Some("node7"));
        let m = setup.management.unwrap();
        assert_eq!(
            (
                m.interface.as_str(),
                m.dhcp,
                m.address.as_deref(),
                m.gateway.as_deref()
            ),
            ("eno1", false, Some("10.0.0.7/24"), Some("10.0.0.1"))
        );
        assert_eq!(m.dns, ["10.0.0.1", "9.9.9.9"]);
        assert_eq!(setup.storage_disks, ["/dev/sdb", "/dev/sdc"]);
        assert_eq!(wipe, ["/dev/sdc"]);
        assert!(matches!(app.screen, Screen::Working { .. }));
    }

    #[test]
    fn a_bad_token_is_explained_and_can_be_corrected() {
        let mut app = App::new();
        app.on_key(Key::Char('j'));
        typed(&mut app, "not-a-token");
        app.on_key(Key::Enter);
        let Screen::TokenEntry { error, .. } = &app.screen else {
            panic!()
        };
        assert!(error.as_ref().unwrap().contains("malformed"));
        app.on_key(Key::Backspace);
        let Screen::TokenEntry { text, error } = &app.screen else {
            panic!()
        };
        assert_eq!((text.as_str(), error), ("not-a-toke", &None));
    }

    /// Esc at every step of both flows returns to the first screen and asks
    /// for nothing: the node stays unconfigured.
    #[test]
    fn cancel_at_every_step_leaves_the_node_unconfigured() {
        let (raw, _) = token();
        let flows: Vec<Vec<Key>> = vec![
            vec![Key::Char('c')],
            vec![Key::Char('c'), Key::Char('x')],
            vec![Key::Char('j')],
            vec![Key::Char('j'), Key::Char('a')],
            vec![Key::Char('s'), Key::Char('x'), Key::Down, Key::Char('y')],
            raw.chars()
                .map(Key::Char)
                .chain([Key::Enter])
                .collect::<Vec<_>>(),
            raw.chars()
                .map(Key::Char)
                .chain([Key::Enter, Key::Char('y')])
                .collect::<Vec<_>>(),
        ];
        for (i, keys) in flows.into_iter().enumerate() {
            let mut app = App::new();
            if i >= 5 {
                app.on_key(Key::Char('j'));
            }
            let mut effects = Vec::new();
            for key in keys {
                effects.extend(app.on_key(key));
            }
            effects.extend(app.on_key(Key::Esc));
            assert!(
                matches!(app.screen, Screen::Welcome { .. }),
                "flow {i}: {:?}",
                app.screen
            );
            assert!(
                effects
                    .iter()
                    .all(|e| matches!(e, Effect::RunPreflight { .. })),
                "flow {i} asked for {effects:?}"
            );
        }
        // "n" at the fingerprint goes back to the token, unchanged.
        let mut app = App::new();
        app.on_key(Key::Char('j'));
        typed(&mut app, &raw);
        app.on_key(Key::Enter);
        assert_eq!(app.on_key(Key::Char('n')), None);
        assert!(matches!(&app.screen, Screen::TokenEntry { text, .. } if *text == raw));
    }

    #[test]
    fn dashboard_actions_need_confirmation() {
        let mut app = App::new();
        app.status.configured = true;
        app.screen = Screen::Dashboard;
        assert_eq!(app.on_key(Key::Char('l')), None);
        assert_eq!(app.on_key(Key::Char('n')), None);
        assert_eq!(app.screen, Screen::Dashboard);
        app.on_key(Key::Char('t'));
        assert_eq!(app.on_key(Key::Char('y')), Some(Effect::CreateJoinToken));
        app.on_event(Event::JoinToken("tok".into()));
        assert_eq!(
            app.screen,
            Screen::ShowToken {
                token: "tok".into()
            }
        );
        app.on_key(Key::Enter);
        app.on_key(Key::Char('l'));
        assert_eq!(app.on_key(Key::Char('y')), Some(Effect::Leave));
        app.on_key(Key::Char('m'));
        assert_eq!(
            app.on_key(Key::Char('y')),
            Some(Effect::Maintenance { on: true })
        );
        app.status.maintenance = true;
        app.on_key(Key::Char('m'));
        assert_eq!(
            app.on_key(Key::Char('y')),
            Some(Effect::Maintenance { on: false })
        );
        assert_eq!(app.on_key(Key::Interrupt), Some(Effect::Quit));
    }
}
