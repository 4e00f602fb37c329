//! Which exclusions to report, and when. A node is reported when its
//! rejection is new or changed — but at most [`BURST`] times per
//! [`WINDOW`], so that a hostile node flipping its claims cannot flood the
//! API server with Events or the log with lines. Pure: the caller supplies
//! the clock; the metrics count every rejection regardless.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(60);
pub const BURST: usize = 3;

#[derive(Debug, Default)]
pub struct Reports {
    /// The rejection last seen per node (reported or not).
    seen: BTreeMap<String, String>,
    /// When each node was last reported, newest last, within the window.
    sent: BTreeMap<String, VecDeque<Instant>>,
}

impl Reports {
    /// Takes this sync's rejections (node → reason text); returns those to
    /// report now, and forgets nodes no longer rejected.
    pub fn select(&mut self, rejected: &BTreeMap<String, String>, now: Instant) -> Vec<String> {
        self.seen.retain(|n, _| rejected.contains_key(n));
        let mut report = Vec::new();
        for (node, why) in rejected {
            if self.seen.get(node) == Some(why) {
                continue;
            }
            self.seen.insert(node.clone(), why.clone());
            let sent = self.sent.entry(node.clone()).or_default();
            while sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= WINDOW)
            {
                sent.pop_front();
            }
            if sent.len() < BURST {
                sent.push_back(now);
                report.push(node.clone());
            }
        }
        // A node's budget outlives its rejection: flapping between valid
        // and invalid must not refill it.
        self.sent
            .retain(|_, s| s.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, w)| (n.to_string(), w.to_string()))
            .collect()
    }

    #[test]
    fn new_or_changed_rejections_are_reported_once() {
        let mut r = Reports::default();
        let t = Instant::now();
        assert_eq!(r.select(&rejected(&[("evil", "a")]), t), ["evil"]);
        assert!(r.select(&rejected(&[("evil", "a")]), t).is_empty());
        assert_eq!(r.select(&rejected(&[("evil", "b")]), t), ["evil"]);
        assert!(r.select(&rejected(&[]), t).is_empty());
    }

    #[test]
    fn a_flapping_node_is_reported_a_bounded_number_of_times() {
        let mut r = Reports::default();
        let t0 = Instant::now();
        let mut reported = 0;
        // 100 flips in 10 s, between two bad claims and a valid one.
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(i * 100);
            let state = match i % 3 {
                0 => rejected(&[("evil", "claims 8.8.8.0/24")]),
                1 => rejected(&[("evil", "claims 1.0.0.0/8")]),
                _ => rejected(&[]),
            };
            reported += r.select(&state, now).len();
        }
        assert_eq!(reported, BURST);
        // Once the window has passed, a change is reported again.
        let later = t0 + Duration::from_secs(10) + WINDOW;
        assert_eq!(
            r.select(&rejected(&[("evil", "claims x")]), later),
            ["evil"]
        );
        // Budgets are per node.
        assert_eq!(
            r.select(&rejected(&[("evil", "claims y"), ("other", "z")]), later),
            ["evil", "other"]
        );
    }
}
