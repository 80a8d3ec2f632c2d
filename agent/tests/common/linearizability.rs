//! A linearizability checker for a single read/write register, after Wing
//! and Gong with Lowe's memoisation: depth-first search over the orders in
//! which operations may take effect, pruning states (set of operations
//! applied, register value) already proven dead.
//!
//! Operations whose outcome the client never learned (a timeout, a dropped
//! connection) may have taken effect at any moment after they were called,
//! or never: they are given an infinite return time and are not required to
//! be linearized.

use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write(String),
    /// The value read; `None` if the register was never written.
    Read(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub client: usize,
    pub op: Op,
    pub call_ns: u128,
    /// `None` when the outcome is unknown.
    pub return_ns: Option<u128>,
}

pub struct Checker<'a> {
    events: &'a [Event],
    dead: HashSet<(Vec<u64>, Option<String>)>,
    steps: u64,
    step_limit: u64,
}

/// Why a history could not be shown linearizable.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    /// The search exceeded its budget; nothing was proven.
    TooLarge,
}

impl<'a> Checker<'a> {
    fn done_mask_has(mask: &[u64], i: usize) -> bool {
        mask[i / 64] & (1 << (i % 64)) != 0
    }

    fn with(mask: &[u64], i: usize) -> Vec<u64> {
        let mut m = mask.to_vec();
        m[i / 64] |= 1 << (i % 64);
        m
    }

    fn search(&mut self, mask: &[u64], value: &Option<String>) -> Option<bool> {
        self.steps += 1;
        if self.steps > self.step_limit {
            return None;
        }
        let pending: Vec<usize> = (0..self.events.len())
            .filter(|&i| !Self::done_mask_has(mask, i))
            .collect();
        if pending.iter().all(|&i| self.events[i].return_ns.is_none()) {
            return Some(true);
        }
        if self.dead.contains(&(mask.to_vec(), value.clone())) {
            return Some(false);
        }
        // An operation can take effect next only if it was called before
        // every other pending operation returned.
        let earliest_return = pending
            .iter()
            .filter_map(|&i| self.events[i].return_ns)
            .min()
            .unwrap_or(u128::MAX);
        for &i in &pending {
            let event = &self.events[i];
            if event.call_ns > earliest_return {
                continue;
            }
            let next_value = match &event.op {
                Op::Write(v) => Some(v.clone()),
                Op::Read(seen) if seen == value => value.clone(),
                Op::Read(_) => continue,
            };
            let next = Self::with(mask, i);
            match self.search(&next, &next_value) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => return None,
            }
        }
        self.dead.insert((mask.to_vec(), value.clone()));
        Some(false)
    }
}

pub fn check(events: &[Event]) -> Verdict {
    let mut checker = Checker {
        events,
        dead: HashSet::new(),
        steps: 0,
        step_limit: 5_000_000,
    };
    let mask = vec![0u64; events.len().div_ceil(64).max(1)];
    match checker.search(&mask, &None) {
        Some(true) => Verdict::Linearizable,
        Some(false) => Verdict::NotLinearizable,
        None => Verdict::TooLarge,
    }
}

#[cfg(test)]
pub fn event(client: usize, op: Op, call_ns: u128, return_ns: Option<u128>) -> Event {
    Event {
        client,
        op,
        call_ns,
        return_ns,
    }
}
