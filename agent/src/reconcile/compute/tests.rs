//! The compute reconciler's plans, checked case by case.

use super::*;

const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn record(power: PowerState, state: VmState) -> VmRecord {
    crate::state::vms::sample_record(power, state)
}

fn spec(vm: &VmRecord) -> DomainSpec {
    DomainSpec {
        id: vm.id.clone(),
        uuid: "00000000-0000-4000-8000-000000000000".into(),
        virt_type: VirtType::Qemu,
        vcpus: vm.vcpus as u32,
        memory_bytes: vm.memory_bytes,
        disks: Vec::new(),
        nics: Vec::new(),
        node: "c-1".into(),
        project: vm.project.clone(),
        name: vm.name.clone(),
        generation: vm.generation,
        console_log: None,
    }
}

fn domain(generation: u64, power: Power) -> Observed {
    Observed {
        id: "vm-1".into(),
        generation,
        power,
    }
}

/// One row: the record (with a change applied), the domain, what was
/// remembered (reboots seen, stop asked this long ago); the actions and
/// the state to report.
struct Case {
    name: &'static str,
    power: PowerState,
    last_seen: VmState,
    change: fn(&mut VmRecord),
    domain: Option<(u64, Power)>,
    reboots_seen: Option<u64>,
    stop_asked_secs_ago: Option<u64>,
    network_ready: bool,
    actions: &'static [&'static str],
    state: VmState,
}

fn name_of(action: &Action) -> &'static str {
    match action {
        Action::Define(_) => "define",
        Action::Start => "start",
        Action::Shutdown => "shutdown",
        Action::Destroy => "destroy",
        Action::Reboot => "reboot",
        Action::Resume => "resume",
    }
}

/// A VM migrated to its node, in `phase`.
fn migrated(vm: &mut VmRecord, phase: crate::state::migration::Phase) {
    let mut moving = vm.clone();
    moving.node_id = 9;
    crate::state::migration::begin_for_tests(&mut moving, vm.node_id);
    let mut m = moving.migration.unwrap();
    m.phase = phase;
    vm.migration = Some(m);
}

fn check(case: &Case) -> VmPlan {
    let now = Instant::now() + Duration::from_secs(3600);
    let mut vm = record(case.power, case.last_seen);
    (case.change)(&mut vm);
    let observed = case
        .domain
        .map(|(generation, power)| domain(generation, power));
    let memory = VmMemory {
        reboots_seen: case.reboots_seen,
        stop_asked_at: case
            .stop_asked_secs_ago
            .map(|s| now - Duration::from_secs(s)),
    };
    let plan = plan_vm(
        &vm,
        observed.as_ref(),
        || {
            if case.network_ready {
                Ok(spec(&vm))
            } else {
                Err("waiting for the network fabric to build bridge albr-7".into())
            }
        },
        memory,
        now,
        STOP_TIMEOUT,
    );
    let actions: Vec<&str> = plan.actions.iter().map(name_of).collect();
    assert_eq!(
        (actions.as_slice(), plan.state),
        (case.actions, case.state),
        "case: {}",
        case.name
    );
    plan
}

fn unchanged(_: &mut VmRecord) {}

const RUNNING: PowerState = PowerState::Running;
const STOPPED: PowerState = PowerState::Stopped;

#[test]
fn the_plan_for_each_desired_and_observed_state() {
    let cases = [
        Case {
            name: "a new VM is defined and started",
            power: RUNNING,
            last_seen: VmState::Creating,
            change: unchanged,
            domain: None,
            reboots_seen: None,
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["define", "start"],
            state: VmState::Running,
        },
        Case {
            name: "a new VM waits for its network before anything is defined",
            power: RUNNING,
            last_seen: VmState::Creating,
            change: unchanged,
            domain: None,
            reboots_seen: None,
            stop_asked_secs_ago: None,
            network_ready: false,
            actions: &[],
            state: VmState::Creating,
        },
        Case {
            name: "a defined VM that never ran is started",
            power: RUNNING,
            last_seen: VmState::Creating,
            change: unchanged,
            domain: Some((2, Power::Stopped)),
            reboots_seen: None,
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["start"],
            state: VmState::Running,
        },
        Case {
            name: "a running VM is left alone",
            power: RUNNING,
            last_seen: VmState::Running,
            change: unchanged,
            domain: Some((2, Power::Running)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Running,
        },
        Case {
            name: "a reboot request is carried out once",
            power: RUNNING,
            last_seen: VmState::Running,
            change: |vm| vm.reboots = 1,
            domain: Some((2, Power::Running)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["reboot"],
            state: VmState::Running,
        },
        Case {
            name: "reboots asked before a restart of the agent are not replayed",
            power: RUNNING,
            last_seen: VmState::Running,
            change: |vm| vm.reboots = 3,
            domain: Some((2, Power::Running)),
            reboots_seen: None,
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Running,
        },
        Case {
            name: "a guest that powered itself off is reported stopped, not started again",
            power: RUNNING,
            last_seen: VmState::Running,
            change: unchanged,
            domain: Some((2, Power::Stopped)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Stopped,
        },
        Case {
            name: "a guest that powered off while the agent was down stays off",
            power: RUNNING,
            last_seen: VmState::Running,
            change: unchanged,
            domain: Some((2, Power::Stopped)),
            reboots_seen: None,
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Stopped,
        },
        Case {
            name: "a guest that arrived by migration runs once the switch is recorded",
            power: RUNNING,
            last_seen: VmState::Running,
            change: |vm| migrated(vm, crate::state::migration::Phase::Resuming),
            domain: Some((2, Power::Paused)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["resume"],
            state: VmState::Running,
        },
        Case {
            name: "a guest paused by its owner is not resumed after its migration",
            power: RUNNING,
            last_seen: VmState::Paused,
            change: |vm| migrated(vm, crate::state::migration::Phase::Done),
            domain: Some((2, Power::Paused)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Paused,
        },
        Case {
            name: "a paused guest that crashed stays off",
            power: RUNNING,
            last_seen: VmState::Paused,
            change: unchanged,
            domain: Some((2, Power::Crashed)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Stopped,
        },
        Case {
            name: "a start asked for after a power-off starts it",
            power: RUNNING,
            last_seen: VmState::Stopped,
            change: unchanged,
            domain: Some((2, Power::Stopped)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["start"],
            state: VmState::Running,
        },
        Case {
            name: "a VM whose start failed is tried again",
            power: RUNNING,
            last_seen: VmState::Failed,
            change: unchanged,
            domain: Some((2, Power::Stopped)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["start"],
            state: VmState::Running,
        },
        Case {
            name: "a stop asks the guest once",
            power: STOPPED,
            last_seen: VmState::Running,
            change: unchanged,
            domain: Some((2, Power::Running)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["shutdown"],
            state: VmState::Stopping,
        },
        Case {
            name: "a guest asked to stop gets its timeout",
            power: STOPPED,
            last_seen: VmState::Stopping,
            change: unchanged,
            domain: Some((2, Power::Running)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: Some(29),
            network_ready: true,
            actions: &[],
            state: VmState::Stopping,
        },
        Case {
            name: "a guest still running after the timeout is forced off",
            power: STOPPED,
            last_seen: VmState::Stopping,
            change: unchanged,
            domain: Some((2, Power::Running)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: Some(30),
            network_ready: true,
            actions: &["destroy"],
            state: VmState::Stopped,
        },
        Case {
            name: "a forced stop pulls the plug at once",
            power: STOPPED,
            last_seen: VmState::Running,
            change: |vm| vm.force_stop = true,
            domain: Some((2, Power::Running)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["destroy"],
            state: VmState::Stopped,
        },
        Case {
            name: "a stopped VM is left stopped",
            power: STOPPED,
            last_seen: VmState::Stopped,
            change: unchanged,
            domain: Some((2, Power::Stopped)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Stopped,
        },
        Case {
            name: "a resized stopped VM is redefined and not started",
            power: STOPPED,
            last_seen: VmState::Stopped,
            change: |vm| vm.generation = 3,
            domain: Some((2, Power::Stopped)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &["define"],
            state: VmState::Stopped,
        },
        Case {
            name: "a guest shutting down while wanted running is reported stopping",
            power: RUNNING,
            last_seen: VmState::Running,
            change: unchanged,
            domain: Some((2, Power::ShuttingDown)),
            reboots_seen: Some(0),
            stop_asked_secs_ago: None,
            network_ready: true,
            actions: &[],
            state: VmState::Stopping,
        },
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn what_the_plan_remembers() {
    let shutdown = check(&Case {
        name: "a stop asks the guest once",
        power: STOPPED,
        last_seen: VmState::Running,
        change: unchanged,
        domain: Some((2, Power::Running)),
        reboots_seen: Some(0),
        stop_asked_secs_ago: None,
        network_ready: true,
        actions: &["shutdown"],
        state: VmState::Stopping,
    });
    assert!(shutdown.memory.stop_asked_at.is_some());
    let rebooted = check(&Case {
        name: "a reboot request is carried out once",
        power: RUNNING,
        last_seen: VmState::Running,
        change: |vm| vm.reboots = 1,
        domain: Some((2, Power::Running)),
        reboots_seen: Some(0),
        stop_asked_secs_ago: Some(5),
        network_ready: true,
        actions: &["reboot"],
        state: VmState::Running,
    });
    assert_eq!(
        rebooted.memory,
        VmMemory {
            reboots_seen: Some(1),
            stop_asked_at: None
        }
    );
}

#[test]
fn reports_are_made_only_for_news_and_at_most_once_a_second() {
    let now = Instant::now() + Duration::from_secs(3600);
    let vm = record(RUNNING, VmState::Running);
    assert!(!should_report(&vm, VmState::Running, &None, None, now));
    assert!(should_report(&vm, VmState::Stopped, &None, None, now));
    let just_now = Some(now - Duration::from_millis(300));
    assert!(!should_report(&vm, VmState::Stopped, &None, just_now, now));
    let a_while_ago = Some(now - Duration::from_secs(2));
    assert!(should_report(
        &vm,
        VmState::Stopped,
        &None,
        a_while_ago,
        now
    ));
    let failing = Some("cannot start: no memory".to_string());
    assert!(should_report(&vm, VmState::Failed, &failing, None, now));
}
