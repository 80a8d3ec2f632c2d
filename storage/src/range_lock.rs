//! A lock over byte ranges of one object: writes to disjoint ranges run
//! together (they commute, so every replica ends with the same bytes
//! whatever order it applied them in); a write excludes every read and
//! write it overlaps; reads share.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<Held>>,
    released: Notify,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

/// Held until dropped.
#[derive(Debug)]
pub struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

/// The whole object.
pub const ALL: (u64, u64) = (0, u64::MAX);

impl RangeLock {
    /// Takes `[start, end)`, exclusively or shared, waiting for whatever
    /// holds an overlapping range in a way that conflicts.
    pub async fn lock(self: &Arc<Self>, (start, end): (u64, u64), exclusive: bool) -> RangeGuard {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between wakes it.
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap();
                let blocked = held
                    .iter()
                    .any(|h| h.start < end && start < h.end && (h.exclusive || exclusive));
                if !blocked {
                    let id = held.iter().map(|h| h.id + 1).max().unwrap_or(0);
                    held.push(Held {
                        id,
                        start,
                        end,
                        exclusive,
                    });
                    return RangeGuard {
                        lock: self.clone(),
                        id,
                    };
                }
            }
            released.await;
        }
    }

    /// Whether anything holds a range now.
    pub fn is_idle(&self) -> bool {
        self.held.lock().unwrap().is_empty()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.lock.held.lock().unwrap().retain(|h| h.id != self.id);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn blocks(lock: &Arc<RangeLock>, range: (u64, u64), exclusive: bool) -> bool {
        tokio::time::timeout(Duration::from_millis(50), lock.lock(range, exclusive))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn disjoint_writes_share_and_overlaps_wait() {
        let lock = Arc::new(RangeLock::default());
        let a = lock.lock((0, 10), true).await;
        // Disjoint: granted at once, write or read.
        let b = lock.lock((10, 20), true).await;
        assert!(!blocks(&lock, (20, 30), false).await);
        // Overlapping a write: waits, read or write.
        assert!(blocks(&lock, (5, 6), false).await);
        assert!(blocks(&lock, (15, 25), true).await);
        assert!(blocks(&lock, ALL, true).await);
        drop(a);
        assert!(!blocks(&lock, (5, 6), false).await);
        // Reads share; a write over them waits for them.
        let r1 = lock.lock((30, 40), false).await;
        let r2 = lock.lock((35, 45), false).await;
        assert!(blocks(&lock, (39, 41), true).await);
        drop((r1, r2, b));
        assert!(!blocks(&lock, ALL, true).await);
        assert!(lock.is_idle());
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_range_is_released() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(ALL, true).await;
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock((100, 200), true).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
