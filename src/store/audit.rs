//! The audit trail: who did what to which credential, never a secret.
use sqlx::PgPool;
use uuid::Uuid;

/// The outcome of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// One audit entry to write.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub leaf_user_id: Option<Uuid>,
    pub provider: Option<&'a str>,
    pub outcome: Outcome,
    pub request_id: Option<&'a str>,
    pub detail: Option<&'a str>,
}

pub async fn record<'e, E: sqlx::PgExecutor<'e>>(db: E, e: &Entry<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into audit (actor, action, leaf_user_id, provider, outcome, request_id, detail)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(e.actor)
    .bind(e.action)
    .bind(e.leaf_user_id)
    .bind(e.provider)
    .bind(e.outcome.as_str())
    .bind(e.request_id)
    .bind(e.detail)
    .execute(db)
    .await?;
    Ok(())
}

/// Write an audit entry; a failure is logged, never turned into the caller's error.
pub async fn record_logged(pool: &PgPool, e: &Entry<'_>) {
    if let Err(err) = record(pool, e).await {
        tracing::error!(error = %err, action = e.action, "could not write the audit entry");
    }
}
