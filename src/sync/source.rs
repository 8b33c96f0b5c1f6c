//! Where events come from: the [`ChangeSource`] trait, an in-memory [`QueueSource`], and the [`Pipeline`] that
//! drives a source into an [`Applier`] with checkpoints in the ledger.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::sync::{Applier, ChangeEvent, Checkpoint};

/// Events read from a source, and the checkpoint to save once all of them have settled.
#[derive(Clone, Debug, Default)]
pub struct ChangeBatch {
    /// The events, in the source's order.
    pub events: Vec<ChangeEvent>,
    /// Where the next read starts; `None` keeps the current checkpoint.
    pub checkpoint: Option<String>,
}

/// A source of change events (a queue, a source instance's change feed). Delivery is at least once: after a crash
/// the pipeline reads again from its last saved checkpoint, and the applier skips what it already settled.
#[async_trait]
pub trait ChangeSource: Send + Sync + Debug {
    /// The source's name: the ledger keeps its checkpoint under it.
    fn name(&self) -> &str;

    /// Up to `max` events after `checkpoint` (`None`: from the beginning). An empty batch means nothing new now.
    async fn poll(&self, checkpoint: Option<&str>, max: usize) -> Result<ChangeBatch>;
}

/// An in-memory, append-only log of events; checkpoints are positions in it. For tests, simulations, and apps
/// that publish their changes in-process.
#[derive(Debug)]
pub struct QueueSource {
    name: String,
    log: Mutex<Vec<ChangeEvent>>,
}

impl QueueSource {
    /// An empty log named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            log: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ChangeEvent>> {
        // Pushing cannot panic halfway, so the log behind a poisoned lock is whole.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an event (the same event may be pushed again: a redelivery).
    pub fn push(&self, event: ChangeEvent) {
        self.lock().push(event);
    }

    /// How many events the log holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[async_trait]
impl ChangeSource for QueueSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn poll(&self, checkpoint: Option<&str>, max: usize) -> Result<ChangeBatch> {
        let start = match checkpoint {
            None => 0,
            Some(text) => text.parse::<usize>().map_err(|_| Error::InvalidConfig {
                reason: format!(
                    "source '{}': checkpoint {text:?} is not a position in the queue",
                    self.name
                ),
            })?,
        };
        let log = self.lock();
        let end = log.len().min(start.saturating_add(max));
        let events = log
            .get(start..end)
            .map(<[ChangeEvent]>::to_vec)
            .unwrap_or_default();
        Ok(ChangeBatch {
            checkpoint: (end > start).then(|| end.to_string()),
            events,
        })
    }
}

/// Change events as JSON lines in a file (one [`ChangeEvent`] per line, as `serde_json::to_string` writes
/// them), read from a byte offset: the checkpoint is the offset after the last whole line read. For an outbox a
/// service appends to, a replayable export, or a worker process that must survive restarts in tests. A line that
/// does not parse stops the poll with [`Error::InvalidEvent`] naming the file and the line's byte offset (a
/// permanent error: a worker stops rather than skip it); a last line without its newline is not read yet (it may
/// be half written).
#[derive(Debug)]
pub struct JsonLinesSource {
    name: String,
    path: std::path::PathBuf,
}

impl JsonLinesSource {
    /// The file at `path`, as source `name`.
    pub fn new(name: impl Into<String>, path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
        }
    }

    fn io_error(&self, what: &str, err: &std::io::Error) -> Error {
        Error::Backend {
            backend: format!("source {}", self.name),
            message: format!("{what} {}: {err}", self.path.display()),
            retryable: true,
            source: None,
        }
    }
}

#[async_trait]
impl ChangeSource for JsonLinesSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn poll(&self, checkpoint: Option<&str>, max: usize) -> Result<ChangeBatch> {
        use std::io::{BufRead, Seek, SeekFrom};
        let start = match checkpoint {
            None => 0,
            Some(text) => text.parse::<u64>().map_err(|_| Error::InvalidConfig {
                reason: format!(
                    "source '{}': checkpoint {text:?} is not a byte offset in {}",
                    self.name,
                    self.path.display()
                ),
            })?,
        };
        // Small reads of a local file: blocking them briefly is cheaper than a thread hand-off.
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ChangeBatch::default());
            }
            Err(err) => return Err(self.io_error("opening", &err)),
        };
        let mut reader = std::io::BufReader::new(file);
        reader
            .seek(SeekFrom::Start(start))
            .map_err(|err| self.io_error("seeking in", &err))?;
        let mut events = Vec::new();
        let mut offset = start;
        let mut line = Vec::new();
        while events.len() < max {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|err| self.io_error("reading", &err))?;
            if read == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let at = offset;
            offset += read as u64;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event = ChangeEvent::from_json(&line).map_err(|err| Error::InvalidEvent {
                event_id: None,
                reason: format!("{} at byte {at}: {err}", self.path.display()),
            })?;
            events.push(event);
        }
        Ok(ChangeBatch {
            checkpoint: (offset > start).then(|| offset.to_string()),
            events,
        })
    }
}

/// Reads a source into an applier: each poll's events are applied in order, then the checkpoint is saved in the
/// applier's ledger. A crash between the two re-reads the batch, whose events then settle as duplicates.
#[derive(Clone, Debug)]
pub struct Pipeline {
    source: Arc<dyn ChangeSource>,
    applier: Applier,
    batched: bool,
}

impl Pipeline {
    /// A pipeline from `source` through `applier`.
    pub fn new(source: Arc<dyn ChangeSource>, applier: Applier) -> Self {
        Self {
            source,
            applier,
            batched: false,
        }
    }

    /// Applies each poll's events as one batch ([`Applier::apply_batch`]) instead of one by one: one store batch
    /// per poll, the throughput setting.
    pub fn batched(mut self, batched: bool) -> Self {
        self.batched = batched;
        self
    }

    /// The applier (for its statistics).
    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// One poll of up to `max` events: applies them and saves the checkpoint with them. Returns how many there
    /// were. `Err` when the source or the ledger failed; nothing after the last saved checkpoint is lost, it is
    /// read again.
    pub async fn run_once(&self, max: usize) -> Result<usize> {
        let ledger = self.applier.ledger();
        let name = self.source.name();
        let checkpoint = ledger.checkpoint(name).await?;
        let batch = self.source.poll(checkpoint.as_deref(), max).await?;
        let count = batch.events.len();
        let checkpoint = batch.checkpoint.map(|token| Checkpoint {
            source: name.to_owned(),
            token,
        });
        if self.batched {
            // One transaction: the batch's outcomes and the checkpoint.
            self.applier
                .apply_batch_from(batch.events, checkpoint)
                .await?;
        } else {
            for event in batch.events {
                self.applier.apply(event).await?;
            }
            if checkpoint.is_some() {
                self.applier
                    .apply_batch_from(Vec::new(), checkpoint)
                    .await?;
            }
        }
        tracing::debug!(source = name, events = count, "poll applied");
        Ok(count)
    }

    /// Polls until the source has nothing new; returns how many events were applied.
    pub async fn drain(&self, max_per_poll: usize) -> Result<usize> {
        let mut total = 0;
        loop {
            let count = self.run_once(max_per_poll.max(1)).await?;
            if count == 0 {
                return Ok(total);
            }
            total += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::EntityRef;
    use crate::record::Record;

    fn event(i: u64) -> ChangeEvent {
        let record = Record::new(
            EntityRef::by_key("account", [("accountnumber", format!("A-{i}"))]).unwrap(),
        );
        ChangeEvent::upsert("us", &record, i)
    }

    #[tokio::test]
    async fn json_lines_are_read_from_a_byte_offset_whole_lines_only() {
        use std::io::Write as _;
        let path = std::env::temp_dir().join(format!("events-{}.jsonl", uuid::Uuid::new_v4()));
        let source = JsonLinesSource::new("us", &path);
        assert!(
            source.poll(None, 10).await.unwrap().events.is_empty(),
            "no file yet: nothing"
        );
        let mut file = std::fs::File::create(&path).unwrap();
        let events: Vec<ChangeEvent> = (0..3).map(event).collect();
        for e in &events {
            writeln!(file, "{}", serde_json::to_string(e).unwrap()).unwrap();
        }
        // A line still being written.
        write!(file, "{{\"schema_version\": 1, ").unwrap();
        file.flush().unwrap();
        let first = source.poll(None, 2).await.unwrap();
        assert_eq!(first.events, events[..2]);
        let rest = source.poll(first.checkpoint.as_deref(), 10).await.unwrap();
        assert_eq!(
            rest.events,
            events[2..],
            "the half-written line is not read"
        );
        let nothing = source.poll(rest.checkpoint.as_deref(), 10).await.unwrap();
        assert!(nothing.events.is_empty() && nothing.checkpoint.is_none());
        writeln!(file, "not json").unwrap();
        let err = source
            .poll(rest.checkpoint.as_deref(), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidEvent { reason, .. } if reason.contains("at byte")),
            "{err}"
        );
        assert!(!err.is_retryable());
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn the_queue_reads_from_a_checkpoint_in_steps() {
        let queue = QueueSource::new("us");
        for i in 0..5 {
            queue.push(event(i));
        }
        let first = queue.poll(None, 2).await.unwrap();
        assert_eq!(first.events.len(), 2);
        let rest = queue.poll(first.checkpoint.as_deref(), 10).await.unwrap();
        assert_eq!(rest.events.len(), 3);
        assert_eq!(rest.events[0].source_version, 2);
        let nothing = queue.poll(rest.checkpoint.as_deref(), 10).await.unwrap();
        assert!(nothing.events.is_empty() && nothing.checkpoint.is_none());
        assert!(matches!(
            queue.poll(Some("x"), 1).await,
            Err(Error::InvalidConfig { .. })
        ));
    }
}
