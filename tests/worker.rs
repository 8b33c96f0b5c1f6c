//! The long-running worker and durable deferred work: tasks survive restarts, run once their record's guard says
//! `Now`, retry with backoff, fail visibly; the worker polls, settles, runs tasks, replays on request and stops
//! cleanly.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use eventual_upsert::memory::MemoryStore;
use eventual_upsert::sync::{
    Applier, ChangeEvent, ChangeSource, Ledger, MemoryLedger, QueueSource, Stopped, SyncWorker,
    TaskContext, TaskHandlers, TaskQueue, TaskRunner, TaskSettings, TaskStatus, WorkerSettings,
};
use eventual_upsert::{
    EnsuringWriter, EntityRef, Error, PlaceholderAction, Policies, Proceed, Record, RecordStore,
    Result, TableName, TablePolicy,
};

struct World {
    store: Arc<MemoryStore>,
    ledger: Arc<MemoryLedger>,
    writer: EnsuringWriter,
    queue: Arc<QueueSource>,
    /// Effects of the `send_invoice` handler, by idempotency key.
    invoices: Arc<Mutex<Vec<String>>>,
}

fn world() -> World {
    let store = Arc::new(MemoryStore::new(common::accounts_and_contacts()).named("eu"));
    let policy = Policies::builder()
        .table(
            "account",
            TablePolicy::builder()
                .primary_name("name")
                .required("telephone1")
                .on_placeholder("send_invoice", PlaceholderAction::Defer),
        )
        .build()
        .unwrap();
    World {
        writer: EnsuringWriter::new(store.clone()).with_policy(policy),
        store,
        ledger: Arc::new(MemoryLedger::new()),
        queue: Arc::new(QueueSource::new("us")),
        invoices: Arc::new(Mutex::new(Vec::new())),
    }
}

impl World {
    fn handlers(&self) -> TaskHandlers {
        let invoices = self.invoices.clone();
        TaskHandlers::new().register("send_invoice", move |ctx: TaskContext| {
            let invoices = invoices.clone();
            async move {
                #[derive(serde::Deserialize)]
                struct Invoice {
                    amount: f64,
                }
                let invoice: Invoice = ctx.payload()?;
                assert!(invoice.amount > 0.0);
                let phone = ctx.record.record.field("telephone1").cloned();
                assert!(
                    phone.is_some(),
                    "a handler only ever sees a hydrated record"
                );
                let mut sent = invoices.lock().unwrap();
                // Idempotent by its key, as a real handler would be.
                if !sent.iter().any(|k| k == ctx.idempotency_key()) {
                    sent.push(ctx.idempotency_key().to_owned());
                }
                Ok(())
            }
        })
    }

    fn runner(&self, handlers: TaskHandlers) -> TaskRunner {
        TaskRunner::new(
            self.ledger.clone(),
            self.store.clone(),
            self.writer.policy().clone(),
            handlers,
        )
        .with_settings(TaskSettings {
            recheck: Duration::ZERO,
            backoff: Duration::ZERO,
            lease: Duration::from_secs(60),
            ..TaskSettings::default()
        })
    }

    fn applier(&self) -> Applier {
        Applier::builder(self.writer.clone(), self.ledger.clone())
            .build(None)
            .unwrap()
    }

    fn worker(&self, settings: WorkerSettings) -> SyncWorker {
        SyncWorker::builder(self.queue.clone(), self.applier())
            .tasks(self.runner(self.handlers()))
            .settings(settings)
            .build()
    }

    /// The LOB app: an order for account `number`, whose invoice waits for the account's real data.
    async fn order(&self, number: &str) -> (EntityRef, Uuid) {
        let account = EntityRef::by_key("account", [("accountnumber", number)]).unwrap();
        let contact = Record::builder(EntityRef::by_id("contact", Uuid::new_v4()).unwrap())
            .field("fullname", "Ada")
            .lookup("parentcustomerid", account.clone())
            .build()
            .unwrap();
        self.writer.write(contact).await.unwrap();
        let stored = self.store.read(&account).await.unwrap().unwrap();
        assert_eq!(
            self.writer
                .guard(&stored.record)
                .check("send_invoice")
                .unwrap(),
            Proceed::Deferred
        );
        TaskQueue::new(self.ledger.clone())
            .defer(
                "send_invoice",
                &TableName::new("account").unwrap(),
                stored.id,
                json!({"amount": 12.5}),
            )
            .await
            .unwrap();
        (account, stored.id)
    }

    fn sync_account(&self, number: &str, version: u64, phone: Option<&str>) {
        let mut record =
            Record::builder(EntityRef::by_key("account", [("accountnumber", number)]).unwrap())
                .field("name", format!("Account {number}"));
        if let Some(phone) = phone {
            record = record.field("telephone1", phone);
        }
        let event = ChangeEvent::upsert("us", &record.build().unwrap(), version);
        self.queue.push(event);
    }

    fn sent(&self) -> Vec<String> {
        self.invoices.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_deferred_task_runs_once_when_the_guard_first_says_now_even_after_a_restart() {
    let w = world();
    let (_, id) = w.order("A-1").await;
    let first = w.worker(WorkerSettings::default());
    let turn = first.run_once().await.unwrap();
    assert_eq!((turn.events, turn.tasks), (0, 1));
    assert!(
        w.sent().is_empty(),
        "the account is a placeholder: the task waits"
    );

    // A partial sync (no telephone1, which the policy requires): still not hydrated, still waiting.
    w.sync_account("A-1", 1, None);
    first.run_once().await.unwrap();
    assert!(
        w.sent().is_empty(),
        "hydrated in the store's eyes is not enough"
    );

    // The worker is replaced (a deploy); the new one finds the task in the ledger.
    drop(first);
    let second = w.worker(WorkerSettings::default());
    w.sync_account("A-1", 2, Some("+1 555 0100"));
    second.run_once().await.unwrap();
    assert_eq!(w.sent(), [format!("send_invoice:account:{id}")]);
    second.run_once().await.unwrap();
    second.run_once().await.unwrap();
    assert_eq!(w.sent().len(), 1, "once");
    let tasks = w.ledger.tasks(10).await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!((tasks[0].status, tasks[0].attempts), (TaskStatus::Done, 1));
    // Deferring the same thing again does not run it again.
    TaskQueue::new(w.ledger.clone())
        .defer(
            "send_invoice",
            &TableName::new("account").unwrap(),
            id,
            json!({"amount": 12.5}),
        )
        .await
        .unwrap();
    second.run_once().await.unwrap();
    assert_eq!(w.sent().len(), 1);
}

#[tokio::test]
async fn tasks_that_cannot_run_fail_visibly_with_the_reason() {
    let w = world();
    let (_, id) = w.order("A-2").await;
    let queue = TaskQueue::new(w.ledger.clone());
    let account = TableName::new("account").unwrap();
    queue
        .defer("nobody_handles_this", &account, id, json!({}))
        .await
        .unwrap();
    queue
        .defer_with_key(
            "bad-payload",
            "send_invoice",
            &account,
            id,
            json!({"amount": "lots"}),
        )
        .await
        .unwrap();
    w.sync_account("A-2", 1, Some("+1"));
    let worker = w.worker(WorkerSettings::default());
    worker.run_once().await.unwrap();
    let tasks = w.ledger.tasks(10).await.unwrap();
    let by_id = |key: &str| tasks.iter().find(|t| t.id == key).unwrap().clone();
    let unknown = by_id(&format!("nobody_handles_this:account:{id}"));
    assert_eq!(unknown.status, TaskStatus::Failed);
    let error = unknown.last_error.unwrap();
    assert!(
        error.contains("nobody_handles_this") && error.contains("no handler"),
        "{error}"
    );
    let bad = by_id("bad-payload");
    assert_eq!(bad.status, TaskStatus::Failed);
    assert!(bad.last_error.unwrap().contains("payload does not read"));
    assert_eq!(
        by_id(&format!("send_invoice:account:{id}")).status,
        TaskStatus::Done,
        "the good task ran all the same"
    );
    assert_eq!(worker.stats().tasks.failed, 2);
}

#[tokio::test]
async fn a_transient_handler_failure_is_retried_then_succeeds() {
    let w = world();
    let (_, id) = w.order("A-3").await;
    w.sync_account("A-3", 1, Some("+1"));
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let handlers = TaskHandlers::new().register("send_invoice", move |_ctx: TaskContext| {
        let c = c.clone();
        async move {
            let mut calls = c.lock().unwrap();
            *calls += 1;
            match *calls {
                1 | 2 => Err(Error::Unavailable {
                    backend: "smtp".into(),
                    reason: "busy".into(),
                    retry_after: None,
                }),
                _ => Ok(()),
            }
        }
    });
    w.applier()
        .apply_all(w.queue.poll(None, 10).await.unwrap().events)
        .await
        .unwrap();
    let runner = w.runner(handlers);
    for _ in 0..3 {
        runner.run_due().await.unwrap();
    }
    let task = w.ledger.tasks(1).await.unwrap().remove(0);
    assert_eq!(task.id, format!("send_invoice:account:{id}"));
    assert_eq!((task.status, task.attempts), (TaskStatus::Done, 3));
    assert_eq!(*calls.lock().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_worker_runs_until_shutdown_and_replays_on_request() {
    let w = world();
    w.order("A-4").await;
    let worker = w.worker(WorkerSettings {
        idle_wait: Duration::from_millis(10),
        ..WorkerSettings::default()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let worker = worker.clone();
        async move {
            worker
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        }
    });
    // A poison event (a lookup to a table the target does not have) is dead-lettered; a good one applied.
    let bad = Record::builder(EntityRef::by_id("invoice", Uuid::new_v4()).unwrap())
        .field("name", "x")
        .build()
        .unwrap();
    w.queue.push(ChangeEvent::upsert("us", &bad, 1));
    w.sync_account("A-4", 1, Some("+1"));
    worker.wake();
    // The paused clock advances only while every task waits, so these waits cost no real time.
    while worker.stats().tasks.done < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = worker.stats();
    assert_eq!(
        (stats.sync.applied, stats.sync.dead_lettered),
        (1, 1),
        "{stats:?}"
    );
    assert!(stats.idle_polls > 0);
    worker.request_replay(10);
    while worker.stats().replays < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        w.ledger.dead_letter_count().await.unwrap(),
        1,
        "it fails again: still there"
    );
    stop.send(()).unwrap();
    assert_eq!(running.await.unwrap().unwrap(), Stopped::Shutdown);
    let totals = w.ledger.totals().await.unwrap();
    assert_eq!(totals.received, 2);
    assert!(totals.is_accounted(), "{totals}");
    assert_eq!(
        w.ledger.checkpoint("us").await.unwrap().as_deref(),
        Some("2"),
        "the checkpoint was settled with the batch"
    );
}

#[tokio::test]
async fn a_permanent_failure_stops_the_worker_with_the_error() {
    let w = world();
    let worker = w.worker(WorkerSettings::default());
    // A checkpoint the source cannot read: permanent.
    let mut settlement = eventual_upsert::sync::Settlement::at(1);
    settlement.checkpoint = Some(eventual_upsert::sync::Checkpoint {
        source: "us".into(),
        token: "not-a-position".into(),
    });
    w.ledger.settle(&settlement).await.unwrap();
    let result: Result<Stopped> = worker.run(std::future::pending()).await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert_eq!(worker.stats().errors, 1);
}
