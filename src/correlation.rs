//! Correlation ids: one id per logical operation, carried from the caller through every store call it makes.
//!
//! A caller (a line-of-business request handler, the sync applier) runs its work inside [`scope`]; stores read
//! [`current`] and attach it to what they send (the Dataverse adapter puts it in a request header and in its
//! `tracing` spans). Outside a scope, each store operation makes up its own id.

use std::future::Future;

use uuid::Uuid;

tokio::task_local! {
    static CURRENT: Uuid;
}

/// Runs `work` with `id` as the current correlation id.
pub async fn scope<F: Future>(id: Uuid, work: F) -> F::Output {
    CURRENT.scope(id, work).await
}

/// The correlation id of the enclosing [`scope`], if any.
pub fn current() -> Option<Uuid> {
    CURRENT.try_with(|id| *id).ok()
}

/// The enclosing scope's id, or a fresh one.
pub fn current_or_new() -> Uuid {
    current().unwrap_or_else(Uuid::new_v4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_scope_id_is_seen_inside_and_only_inside() {
        let id = Uuid::from_u128(7);
        assert_eq!(current(), None);
        let seen = scope(id, async { (current(), current_or_new()) }).await;
        assert_eq!(seen, (Some(id), id));
        assert_eq!(current(), None);
        assert_ne!(current_or_new(), current_or_new());
    }
}
