//! What the pipeline did, counted: [`SyncCounters`] while it runs, [`SyncStats`] to read.
//!
//! See [`SyncStats`] for how the counters add up.

use std::fmt;
use std::ops::{Add, AddAssign};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The pipeline's counters at one moment.
///
/// # Accounting
///
/// Every event the pipeline receives **settles** exactly once, as one of *applied*, *duplicate* (already
/// processed), *stale* (an older version than the one applied), *echo* (our own write coming back) or
/// *dead-lettered*. Replaying a dead letter settles its event again, with the replay's outcome, and counts as
/// *replayed* when it succeeds (applied, or found to be a duplicate, stale or an echo by now); a replay that fails
/// again counts nothing, because the letter stays where it was. So, once a run has drained:
///
/// ```text
/// applied + duplicate + stale + echo + dead_lettered  ==  received + replayed
/// ```
///
/// which is [`SyncStats::is_accounted`]. Every counter only goes up, so they export as monotonic metrics, and the
/// rule holds for replays of letters dead-lettered by an earlier run too (such a replay adds one settlement and one
/// replay, and nothing else). `dead_lettered - replayed` is how much the dead-letter queue grew during the run, less
/// any redeliveries that merged into a letter already there.
///
/// *retried*, *placeholders_created* and *hydrated* describe work done along the way and are outside the rule. An
/// event still in flight (or lost in flight with a crashed worker, to be redelivered to the next) is received but
/// not yet settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStats {
    /// Events delivered to the pipeline, redeliveries included.
    pub received: u64,
    /// Events written to the target (replays included).
    pub applied: u64,
    /// Events skipped because their event id, or their record at that version, was already processed.
    pub duplicate: u64,
    /// Events skipped because a newer version of their record was already applied.
    pub stale: u64,
    /// Events skipped because they were the integration's own writes coming back.
    pub echo: u64,
    /// Events given up on and written to the dead-letter queue.
    pub dead_lettered: u64,
    /// Dead letters replayed successfully (and removed from the queue).
    pub replayed: u64,
    /// Retries of transient failures (each retry of an attempt, not each event).
    pub retried: u64,
    /// Placeholders created for lookup targets that did not exist yet.
    pub placeholders_created: u64,
    /// Placeholders turned into real records by an event.
    pub hydrated: u64,
}

impl SyncStats {
    /// Settlements: `applied + duplicate + stale + echo + dead_lettered` (saturating).
    pub fn settled(&self) -> u64 {
        u64::try_from(self.settled_exact()).unwrap_or(u64::MAX)
    }

    /// Whether everything received (and every successful replay) settled exactly once:
    /// `settled() == received + replayed`. True once a run has drained; false while events are in flight.
    pub fn is_accounted(&self) -> bool {
        self.settled_exact() == u128::from(self.received) + u128::from(self.replayed)
    }

    // In u128, so that stats read from anywhere cannot overflow the sum.
    fn settled_exact(&self) -> u128 {
        [
            self.applied,
            self.duplicate,
            self.stale,
            self.echo,
            self.dead_lettered,
        ]
        .into_iter()
        .map(u128::from)
        .sum()
    }

    /// Adds `n` to one counter (saturating).
    pub fn count(&mut self, counter: Counter, n: u64) {
        let field = counter.field_mut(self);
        *field = field.saturating_add(n);
    }

    /// One counter's value.
    pub fn get(&self, counter: Counter) -> u64 {
        match counter {
            Counter::Received => self.received,
            Counter::Applied => self.applied,
            Counter::Duplicate => self.duplicate,
            Counter::Stale => self.stale,
            Counter::Echo => self.echo,
            Counter::DeadLettered => self.dead_lettered,
            Counter::Replayed => self.replayed,
            Counter::Retried => self.retried,
            Counter::PlaceholdersCreated => self.placeholders_created,
            Counter::Hydrated => self.hydrated,
        }
    }
}

impl Add for SyncStats {
    type Output = SyncStats;

    /// Counter by counter: the stats of several workers (or of runs before and after a restart) as one.
    fn add(mut self, other: SyncStats) -> SyncStats {
        self += other;
        self
    }
}

impl AddAssign for SyncStats {
    fn add_assign(&mut self, other: SyncStats) {
        for counter in Counter::ALL {
            let field = counter.field_mut(self);
            *field = field.saturating_add(other.get(counter));
        }
    }
}

impl fmt::Display for SyncStats {
    /// One line, every counter named: `received 10, applied 7, duplicate 1, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, counter) in Counter::ALL.into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {}", counter.name(), self.get(counter))?;
        }
        Ok(())
    }
}

/// One of the [`SyncStats`] counters, for [`SyncCounters::add`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// [`SyncStats::received`].
    Received,
    /// [`SyncStats::applied`].
    Applied,
    /// [`SyncStats::duplicate`].
    Duplicate,
    /// [`SyncStats::stale`].
    Stale,
    /// [`SyncStats::echo`].
    Echo,
    /// [`SyncStats::dead_lettered`].
    DeadLettered,
    /// [`SyncStats::replayed`].
    Replayed,
    /// [`SyncStats::retried`].
    Retried,
    /// [`SyncStats::placeholders_created`].
    PlaceholdersCreated,
    /// [`SyncStats::hydrated`].
    Hydrated,
}

impl Counter {
    /// Every counter, in [`SyncStats`] field order.
    pub const ALL: [Counter; 10] = [
        Counter::Received,
        Counter::Applied,
        Counter::Duplicate,
        Counter::Stale,
        Counter::Echo,
        Counter::DeadLettered,
        Counter::Replayed,
        Counter::Retried,
        Counter::PlaceholdersCreated,
        Counter::Hydrated,
    ];

    /// The [`SyncStats`] field name, such as `dead_lettered` (for logs and metric names).
    pub fn name(self) -> &'static str {
        match self {
            Counter::Received => "received",
            Counter::Applied => "applied",
            Counter::Duplicate => "duplicate",
            Counter::Stale => "stale",
            Counter::Echo => "echo",
            Counter::DeadLettered => "dead_lettered",
            Counter::Replayed => "replayed",
            Counter::Retried => "retried",
            Counter::PlaceholdersCreated => "placeholders_created",
            Counter::Hydrated => "hydrated",
        }
    }

    fn field_mut(self, stats: &mut SyncStats) -> &mut u64 {
        match self {
            Counter::Received => &mut stats.received,
            Counter::Applied => &mut stats.applied,
            Counter::Duplicate => &mut stats.duplicate,
            Counter::Stale => &mut stats.stale,
            Counter::Echo => &mut stats.echo,
            Counter::DeadLettered => &mut stats.dead_lettered,
            Counter::Replayed => &mut stats.replayed,
            Counter::Retried => &mut stats.retried,
            Counter::PlaceholdersCreated => &mut stats.placeholders_created,
            Counter::Hydrated => &mut stats.hydrated,
        }
    }
}

/// Live counters, shared by the pipeline's tasks (`Arc<SyncCounters>`); lock-free.
#[derive(Debug, Default)]
pub struct SyncCounters {
    counts: [AtomicU64; Counter::ALL.len()],
}

impl SyncCounters {
    /// All zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` to `counter`.
    pub fn add(&self, counter: Counter, n: u64) {
        // SeqCst: with `received` bumped before an event's outcome and read after the outcomes (see `snapshot`),
        // a snapshot never shows an outcome without its receipt.
        self.counts[counter as usize].fetch_add(n, Ordering::SeqCst);
    }

    /// Adds one to `counter`.
    pub fn incr(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Adds every counter of `stats` (a settled batch): receipts and replays first, then outcomes, so that a
    /// concurrent [`snapshot`](Self::snapshot) never shows more settled than received plus replayed.
    pub fn add_stats(&self, stats: &SyncStats) {
        let is_settlement_source = |c: &Counter| matches!(c, Counter::Received | Counter::Replayed);
        let sources = Counter::ALL.into_iter().filter(is_settlement_source);
        let outcomes = Counter::ALL
            .into_iter()
            .filter(|c| !is_settlement_source(c));
        for counter in sources.chain(outcomes) {
            let n = stats.get(counter);
            if n > 0 {
                self.add(counter, n);
            }
        }
    }

    /// One counter's current value.
    pub fn get(&self, counter: Counter) -> u64 {
        self.counts[counter as usize].load(Ordering::SeqCst)
    }

    /// The current values. Exact once the pipeline is idle. While events are in flight, an event counted as
    /// received may not have settled yet; as long as the pipeline counts an event's receipt (or a replay)
    /// before its outcome, the snapshot never shows more settled than received plus replayed.
    pub fn snapshot(&self) -> SyncStats {
        let mut stats = SyncStats::default();
        let is_settlement_source = |c: &Counter| matches!(c, Counter::Received | Counter::Replayed);
        // Outcomes first, then the receipts and replays they must be matched by.
        let outcomes = Counter::ALL
            .into_iter()
            .filter(|c| !is_settlement_source(c));
        let sources = Counter::ALL.into_iter().filter(is_settlement_source);
        for counter in outcomes.chain(sources) {
            *counter.field_mut(&mut stats) = self.get(counter);
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn counters_land_in_their_own_fields() {
        let counters = SyncCounters::new();
        for (i, counter) in Counter::ALL.into_iter().enumerate() {
            counters.add(counter, i as u64 + 1);
        }
        let stats = counters.snapshot();
        assert_eq!(
            stats,
            SyncStats {
                received: 1,
                applied: 2,
                duplicate: 3,
                stale: 4,
                echo: 5,
                dead_lettered: 6,
                replayed: 7,
                retried: 8,
                placeholders_created: 9,
                hydrated: 10,
            }
        );
        for counter in Counter::ALL {
            assert_eq!(stats.get(counter), counters.get(counter));
        }
        let json = serde_json::to_value(stats).unwrap();
        for counter in Counter::ALL {
            assert_eq!(
                json[counter.name()],
                stats.get(counter),
                "{}",
                counter.name()
            );
        }
        assert_eq!(
            stats.to_string(),
            "received 1, applied 2, duplicate 3, stale 4, echo 5, dead_lettered 6, replayed 7, retried 8, \
             placeholders_created 9, hydrated 10"
        );
    }

    #[test]
    fn every_received_event_settles_once() {
        let stats = SyncStats {
            received: 10,
            applied: 5,
            duplicate: 2,
            stale: 1,
            echo: 1,
            dead_lettered: 1,
            retried: 7,
            placeholders_created: 3,
            hydrated: 2,
            replayed: 0,
        };
        assert_eq!(stats.settled(), 10);
        assert!(stats.is_accounted(), "work counters are outside the rule");
        let in_flight = SyncStats {
            received: 11,
            ..stats
        };
        assert!(!in_flight.is_accounted());
        let double_counted = SyncStats {
            applied: 6,
            ..stats
        };
        assert!(!double_counted.is_accounted());
    }

    #[test]
    fn a_successful_replay_settles_again_and_a_failed_one_counts_nothing() {
        let counters = SyncCounters::new();
        // Three events: one applied, two dead-lettered.
        counters.add(Counter::Received, 3);
        counters.incr(Counter::Applied);
        counters.add(Counter::DeadLettered, 2);
        assert!(counters.snapshot().is_accounted());
        // One replay succeeds, the other fails again.
        counters.incr(Counter::Replayed);
        counters.incr(Counter::Applied);
        let stats = counters.snapshot();
        assert!(stats.is_accounted(), "{stats}");
        assert_eq!(
            stats.dead_lettered - stats.replayed,
            1,
            "one letter still waits"
        );

        // A later run replays a letter left by an earlier one: it balances on its own.
        let later = SyncCounters::new();
        later.incr(Counter::Replayed);
        later.incr(Counter::Stale);
        assert!(later.snapshot().is_accounted());
        assert!((stats + later.snapshot()).is_accounted());
    }

    #[test]
    fn stats_add_counter_by_counter() {
        let a = SyncStats {
            received: 1,
            hydrated: 2,
            ..SyncStats::default()
        };
        let mut b = SyncStats {
            received: 3,
            echo: 4,
            ..SyncStats::default()
        };
        b += a;
        assert_eq!(
            b,
            SyncStats {
                received: 4,
                echo: 4,
                hydrated: 2,
                ..SyncStats::default()
            }
        );
        assert_eq!(a + SyncStats::default(), a);
    }

    #[test]
    fn concurrent_snapshots_never_show_an_outcome_before_its_receipt() {
        let counters = Arc::new(SyncCounters::new());
        let writer = {
            let counters = counters.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    counters.incr(Counter::Received);
                    counters.incr(Counter::Applied);
                }
            })
        };
        let mut checks = 0;
        while !writer.is_finished() || checks == 0 {
            let stats = counters.snapshot();
            assert!(
                stats.settled() <= stats.received + stats.replayed,
                "{stats}"
            );
            checks += 1;
        }
        writer.join().unwrap();
        let stats = counters.snapshot();
        assert_eq!((stats.received, stats.applied), (20_000, 20_000));
        assert!(stats.is_accounted());
    }
}
