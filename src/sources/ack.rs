//! Acknowledgement in arrival order: a message may be acknowledged only when it and every
//! message that arrived before it on the same connection are durably stored.

use std::collections::VecDeque;

/// Received messages awaiting their commit, in arrival order. A pure state machine.
///
/// Each connection to the broker is a generation: after a reconnect the broker delivers the
/// unacknowledged messages again, so settlements from an earlier generation are ignored.
#[derive(Debug)]
pub struct AckWindow<T> {
    generation: u64,
    /// Sequence number of the front entry.
    base: u64,
    entries: VecDeque<(T, bool)>,
}

impl<T> Default for AckWindow<T> {
    fn default() -> Self {
        Self {
            generation: 0,
            base: 0,
            entries: VecDeque::new(),
        }
    }
}

impl<T> AckWindow<T> {
    /// Records a received message; returns the `(generation, seq)` its ticket carries.
    pub fn push(&mut self, item: T) -> (u64, u64) {
        let seq = self.base + self.entries.len() as u64;
        self.entries.push_back((item, false));
        (self.generation, seq)
    }

    /// Marks a message stored. Returns true when the front became ready to acknowledge.
    pub fn settle(&mut self, generation: u64, seq: u64) -> bool {
        if generation != self.generation || seq < self.base {
            return false;
        }
        match self.entries.get_mut((seq - self.base) as usize) {
            Some(entry) => entry.1 = true,
            None => return false,
        }
        seq == self.base
    }

    /// The next message to acknowledge, if it and all before it are settled.
    pub fn pop_ready(&mut self) -> Option<T> {
        if self.entries.front().is_some_and(|e| e.1) {
            self.base += 1;
            self.entries.pop_front().map(|e| e.0)
        } else {
            None
        }
    }

    /// Forgets everything: the connection is gone and the broker will deliver again.
    pub fn reset(&mut self) {
        self.generation += 1;
        self.base = 0;
        self.entries.clear();
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut AckWindow<u32>) -> Vec<u32> {
        std::iter::from_fn(|| w.pop_ready()).collect()
    }

    #[test]
    fn acknowledges_in_arrival_order_whatever_the_commit_order() {
        let mut w = AckWindow::default();
        let tickets: Vec<_> = (0..5).map(|i| w.push(i)).collect();
        for &i in &[3usize, 1, 4] {
            w.settle(tickets[i].0, tickets[i].1);
        }
        assert_eq!(drain(&mut w), Vec::<u32>::new());
        assert!(w.settle(tickets[0].0, tickets[0].1));
        assert_eq!(drain(&mut w), vec![0, 1]);
        w.settle(tickets[2].0, tickets[2].1);
        assert_eq!(drain(&mut w), vec![2, 3, 4]);
        assert!(w.is_empty());
    }

    #[test]
    fn ignores_settlements_from_an_earlier_connection() {
        let mut w = AckWindow::default();
        let old = w.push(1);
        w.reset();
        let new = w.push(2);
        assert_eq!(old.1, new.1);
        assert!(!w.settle(old.0, old.1));
        assert_eq!(drain(&mut w), Vec::<u32>::new());
        assert!(w.settle(new.0, new.1));
        assert_eq!(drain(&mut w), vec![2]);
    }

    #[test]
    fn random_commit_orders_always_ack_a_prefix_in_order() {
        let mut seed = 7u64;
        for _ in 0..200 {
            let mut w = AckWindow::default();
            let n = 20;
            let mut tickets: Vec<_> = (0..n).map(|i| (i, w.push(i))).collect();
            for i in (1..tickets.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                tickets.swap(i, (seed >> 33) as usize % (i + 1));
            }
            let mut acked = Vec::new();
            let mut settled = std::collections::HashSet::new();
            for (i, (generation, seq)) in tickets {
                settled.insert(i);
                w.settle(generation, seq);
                acked.extend(drain(&mut w));
                let prefix = (0..n).take_while(|j| settled.contains(j)).count() as u32;
                assert_eq!(acked, (0..prefix).collect::<Vec<_>>());
            }
        }
    }
}
