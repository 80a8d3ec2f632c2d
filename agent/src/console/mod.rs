//! `allod console`: the operator's screen on the node itself (tty1 or a
//! serial console). It talks only to the local agent's admin socket; the
//! agent does the work. The state machine ([`app`]) and the screens
//! ([`view`]) are pure; this module is the terminal and the I/O around them.

pub mod app;
pub mod facts;
pub mod preflight;
pub mod view;

use std::path::{Path, PathBuf};
use std::time::Duration;

use app::{AgentStatus, App, Effect, Event, Key, LocalVm, Member};
use tokio::sync::mpsc;

use crate::daemon::admin::AdminRequest;

/// Reads the agent's state from its admin socket.
pub async fn agent_status(data_dir: &Path) -> AgentStatus {
    match crate::daemon::admin::request_with(data_dir, &AdminRequest::Status, |_| {}).await {
        Err(e) => AgentStatus {
            reachable: false,
            error: Some(format!("{e:#}")),
            ..AgentStatus::default()
        },
        Ok(status) => AgentStatus {
            reachable: true,
            configured: status["configured"].as_bool().unwrap_or(false),
            cluster_id: status["cluster_id"].as_str().unwrap_or_default().into(),
            cluster_name: status["cluster_name"].as_str().unwrap_or_default().into(),
            node_id: status["node_id"].as_u64().unwrap_or(0),
            leader_id: status["leader_id"].as_u64(),
            ca_fingerprint: status["ca_fingerprint"].as_str().unwrap_or_default().into(),
            members: status["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| Member {
                    id: m["id"].as_u64().unwrap_or(0),
                    name: m["name"].as_str().unwrap_or_default().into(),
                    role: m["role"].as_str().unwrap_or_default().into(),
                    peer_addr: m["peer_addr"].as_str().unwrap_or_default().into(),
                    lag: status["lag"][m["id"].as_u64().unwrap_or(0).to_string()].as_u64(),
                })
                .collect(),
            maintenance: status["node"]["maintenance"].as_bool().unwrap_or(false),
            vcpus: status["node"]["vcpus"].as_u64().unwrap_or(0),
            storage: status["storage"].as_str().unwrap_or_default().into(),
            memory_bytes: status["node"]["memory_bytes"].as_u64().unwrap_or(0),
            vms: status["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| LocalVm {
                    project: v["project"].as_str().unwrap_or_default().into(),
                    name: v["name"].as_str().unwrap_or_default().into(),
                    vcpus: v["vcpus"].as_u64().unwrap_or(0),
                    memory_bytes: v["memory_bytes"].as_u64().unwrap_or(0),
                    state: v["state"].as_str().unwrap_or_default().into(),
                })
                .collect(),
            log_tail: status["log_tail"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect(),
            error: None,
        },
    }
}

fn key_of(event: crossterm::event::KeyEvent) -> Option<Key> {
    use crossterm::event::{KeyCode, KeyEventKind, KeyModifiers};
    if event.kind == KeyEventKind::Release {
        return None;
    }
    Some(match event.code {
        KeyCode::Char('c') if event.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        _ => return None,
    })
}

enum Input {
    Key(Key),
    Paste(String),
    Redraw,
    Event(Box<Event>),
}

/// Starts the work an effect asks for; results come back as events.
fn start(effect: Effect, data_dir: &Path, tx: &mpsc::UnboundedSender<Input>) {
    let data_dir = data_dir.to_path_buf();
    let tx = tx.clone();
    tokio::spawn(async move {
        let send = |event| {
            let _ = tx.send(Input::Event(Box::new(event)));
        };
        let admin = |request: AdminRequest| {
            let tx = tx.clone();
            let data_dir = data_dir.clone();
            async move {
                crate::daemon::admin::request_with(&data_dir, &request, |message| {
                    let _ = tx.send(Input::Event(Box::new(Event::Progress(message))));
                })
                .await
            }
        };
        match effect {
            Effect::Quit => {}
            Effect::RunPreflight { token } => {
                send(Event::PreflightDone(
                    preflight::run(&token, &data_dir).await,
                ));
            }
            Effect::CreateCluster { name } => {
                match admin(AdminRequest::Init { cluster_name: name }).await {
                    Ok(result) => send(Event::Done(result)),
                    Err(e) => send(Event::Failed(format!("{e:#}"))),
                }
            }
            Effect::Join { token } => match admin(AdminRequest::Join { token }).await {
                Ok(result) => send(Event::Done(result)),
                Err(e) => send(Event::Failed(format!("{e:#}"))),
            },
            Effect::CreateJoinToken => {
                match admin(AdminRequest::JoinToken { ttl_secs: 3600 }).await {
                    Ok(result) => send(Event::JoinToken(
                        result["token"].as_str().unwrap_or_default().to_string(),
                    )),
                    Err(e) => send(Event::Failed(format!("{e:#}"))),
                }
            }
            Effect::Setup { setup, wipe } => match admin(AdminRequest::Setup { setup, wipe }).await
            {
                Ok(_) => send(Event::Done(serde_json::json!({}))),
                Err(e) => send(Event::Failed(format!("{e:#}"))),
            },
            Effect::Maintenance { on } => match admin(AdminRequest::Maintenance { on }).await {
                Ok(_) => send(Event::Note(if on {
                    "this node is in maintenance: it takes no new VMs".into()
                } else {
                    "this node takes VMs again".into()
                })),
                Err(e) => send(Event::Failed(format!("{e:#}"))),
            },
            Effect::Leave => {
                let status = agent_status(&data_dir).await;
                match admin(AdminRequest::Remove {
                    node: status.node_id.to_string(),
                    force: false,
                })
                .await
                {
                    Ok(_) => send(Event::Note("this node was removed from the cluster".into())),
                    Err(e) => send(Event::Failed(format!("{e:#}"))),
                }
            }
        }
        let _ = tx.send(Input::Event(Box::new(Event::Status(
            agent_status(&data_dir).await,
        ))));
    });
}

/// Runs the console until the operator leaves it with Ctrl-C.
pub async fn run(data_dir: PathBuf) -> anyhow::Result<()> {
    use crossterm::event::{DisableBracketedPaste, EnableBracketedPaste};
    use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    // Keys come from a thread of their own: crossterm's reads block.
    let keys = tx.clone();
    std::thread::spawn(move || loop {
        let input = match crossterm::event::read() {
            Ok(crossterm::event::Event::Key(key)) => match key_of(key) {
                Some(key) => Input::Key(key),
                None => continue,
            },
            Ok(crossterm::event::Event::Paste(text)) => Input::Paste(text),
            Ok(crossterm::event::Event::Resize(..)) => Input::Redraw,
            Ok(_) => continue,
            Err(_) => return,
        };
        if keys.send(input).is_err() {
            return;
        }
    });
    // The machine and the agent, refreshed while the console runs.
    let refresher = {
        let tx = tx.clone();
        let data_dir = data_dir.clone();
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                if tick.is_multiple_of(5) {
                    let facts = tokio::task::spawn_blocking(facts::collect)
                        .await
                        .unwrap_or_default();
                    if tx
                        .send(Input::Event(Box::new(Event::Facts(facts))))
                        .is_err()
                    {
                        return;
                    }
                }
                let status = agent_status(&data_dir).await;
                if tx
                    .send(Input::Event(Box::new(Event::Status(status))))
                    .is_err()
                {
                    return;
                }
                tick += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    crossterm::terminal::enable_raw_mode()?;
    crossterm::execute!(
        std::io::stdout(),
        EnterAlternateScreen,
        EnableBracketedPaste
    )?;
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = crossterm::terminal::disable_raw_mode();
        let _ = crossterm::execute!(std::io::stdout(), LeaveAlternateScreen);
        previous_hook(info);
    }));
    let mut terminal =
        ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(std::io::stdout()))?;
    let mut app = App::new();
    let outcome: anyhow::Result<()> = async {
        loop {
            terminal.draw(|frame| view::render(frame, &app))?;
            let Some(input) = rx.recv().await else {
                return Ok(());
            };
            let effects = match input {
                Input::Key(key) => {
                    app.note = None;
                    app.on_key(key).into_iter().collect()
                }
                Input::Paste(text) => text
                    .chars()
                    .filter_map(|c| app.on_key(Key::Char(c)))
                    .collect::<Vec<_>>(),
                Input::Redraw => Vec::new(),
                Input::Event(event) => {
                    app.on_event(*event);
                    Vec::new()
                }
            };
            for effect in effects {
                if effect == Effect::Quit {
                    return Ok(());
                }
                start(effect, &data_dir, &tx);
            }
        }
    }
    .await;
    refresher.abort();
    crossterm::execute!(
        std::io::stdout(),
        DisableBracketedPaste,
        LeaveAlternateScreen
    )?;
    crossterm::terminal::disable_raw_mode()?;
    outcome
}
