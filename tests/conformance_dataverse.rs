//! The `RecordStore` + `EnsureExists` contract, run against `DataverseStore` over HTTP: on the emulator always,
//! and on a live Dataverse when the `DATAVERSE_*` variables are set.

#[path = "common/dataverse.rs"]
mod dataverse;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use eventual_upsert::dataverse::{DataverseConfig, DataverseStore};
use eventual_upsert::{
    Delete, DeleteOutcome, Ensured, EntityRef, Record, RecordStore, Result, StoredRecord, Write,
    WriteOutcome, conformance,
};

#[path = "common/scenarios.rs"]
#[macro_use]
mod scenarios;

conformance_scenarios!(async {
    let emulator = dataverse::conformance_emulator().await;
    let store: Arc<dyn RecordStore> = Arc::new(dataverse::conformance_store(&emulator));
    (emulator, store)
});

/// All scenarios on one shared emulator, as they would run against a live environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_scenarios_share_one_emulator() {
    let emulator = dataverse::conformance_emulator().await;
    let store: Arc<dyn RecordStore> = Arc::new(dataverse::conformance_store(&emulator));
    conformance::run_all(&store).await;
}

/// The suite against a live Dataverse, when `DATAVERSE_URL`, `DATAVERSE_TENANT_ID`, `DATAVERSE_CLIENT_ID` and
/// `DATAVERSE_CLIENT_SECRET` are set. The environment needs the conformance tables (see the README); every
/// record the run creates is deleted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_dataverse() {
    let config = match DataverseConfig::from_env(conformance::schema()) {
        Ok(Some(config)) => config,
        Ok(None) => {
            eprintln!(
                "live Dataverse run skipped: set DATAVERSE_URL, DATAVERSE_TENANT_ID, DATAVERSE_CLIENT_ID and \
                 DATAVERSE_CLIENT_SECRET to run the conformance suite against an environment"
            );
            return;
        }
        Err(e) => panic!("the DATAVERSE_* variables are incomplete: {e}"),
    };
    let config = dataverse::conformance_settings(config)
        .load_metadata()
        .await
        .unwrap_or_else(|e| panic!("reading table metadata: {e}"));
    let store = config.build().unwrap_or_else(|e| panic!("{e}"));
    let recording = Arc::new(Recording {
        store: store.clone(),
        created: Mutex::new(Vec::new()),
    });
    let shared: Arc<dyn RecordStore> = recording.clone();
    let run = tokio::spawn(async move { conformance::run_all(&shared).await });
    let outcome = run.await;
    let created = std::mem::take(&mut *recording.created.lock().unwrap_or_else(|e| e.into_inner()));
    let mut left = Vec::new();
    for reference in created {
        if let Err(e) = store.delete(&reference).await {
            left.push(format!("{reference}: {e}"));
        }
    }
    assert!(left.is_empty(), "could not clean up: {left:?}");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}

/// Passes everything to the live store and remembers what it created, for the clean-up.
#[derive(Debug)]
struct Recording {
    store: DataverseStore,
    created: Mutex<Vec<EntityRef>>,
}

impl Recording {
    fn remember(&self, record: &Record, id: uuid::Uuid) {
        if let Ok(reference) = EntityRef::by_id(record.table().clone(), id) {
            self.created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(reference);
        }
    }
}

#[async_trait]
impl RecordStore for Recording {
    fn backend(&self) -> &str {
        self.store.backend()
    }

    async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>> {
        self.store.read(reference).await
    }

    async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome> {
        RecordStore::delete(&self.store, delete).await
    }

    async fn write(&self, write: &Write) -> Result<WriteOutcome> {
        let outcome = self.store.write(write).await?;
        if outcome.change == eventual_upsert::Change::Created {
            self.remember(&write.record, outcome.id);
        }
        Ok(outcome)
    }

    async fn ensure_then_write(
        &self,
        placeholders: Vec<Record>,
        writes: &[Write],
    ) -> (Vec<Result<Ensured>>, Vec<Result<WriteOutcome>>) {
        let (ensured, written) = self
            .store
            .ensure_then_write(placeholders.clone(), writes)
            .await;
        for (placeholder, result) in placeholders.iter().zip(&ensured) {
            if let Ok(Ensured::Created { id }) = result {
                self.remember(placeholder, *id);
            }
        }
        for (write, result) in writes.iter().zip(&written) {
            if let Ok(outcome) = result
                && outcome.change == eventual_upsert::Change::Created
            {
                self.remember(&write.record, outcome.id);
            }
        }
        (ensured, written)
    }

    async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>> {
        self.ensure_then_write(Vec::new(), writes).await.1
    }

    async fn ensure_placeholders(&self, placeholders: Vec<Record>) -> Vec<Result<Ensured>> {
        self.ensure_then_write(placeholders, &[]).await.0
    }
}
