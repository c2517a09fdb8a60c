//! The gateway's use cases: create, read, delete a credential, its status and events, with the
//! fall-backs SPEC §4/§5 require when Leaf is unavailable.
//!
//! Owns: the order of "store locally, forward, reconcile", what is audited, and the credential
//! view. Sits between the HTTP layer (which parses requests) and the store / Leaf client.
//! Must never: answer a secret in clear unless the caller may reveal, or lose what a caller
//! sent (a write is in Postgres, with its outbox entry, before Leaf is called).
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::crypto::{Binding, Keyring, SecretFields};
use crate::domain::credential::mask_secrets;
use crate::domain::{CreateBody, Provider, SyncState, redact};
use crate::error::ApiError;
use crate::leaf::{LeafClient, LeafError};
use crate::rowcache::{Cached, RowCache};
use crate::store::ConnStash;
use crate::store::audit::{self, Entry, Outcome};
use crate::store::credentials::{self as creds, CredentialRow, LeafState, StatusSource};
use crate::store::events::{self, Event};

/// Everything the use cases need. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    pub db: PgPool,
    pub keyring: Arc<Keyring>,
    pub leaf: Arc<LeafClient>,
    /// How long the request path owns a fresh outbox entry before the worker may take it.
    pub outbox_grace: Duration,
    /// `checked_at` refreshes from the request path, written in batches ([`Touches`]).
    pub touches: Arc<Touches>,
    /// Connections kept between the primary-key reads that start most requests.
    pub reads: Arc<ConnStash>,
    /// SYNCED rows a forwarded read may trust without reading them (shared by the workers).
    pub rows: Arc<RowCache>,
    /// A create's writes, shared by concurrent creates.
    pub creates: Arc<creds::CreateWrites>,
}

/// The `checked_at` refreshes of forwarded reads whose answer changed nothing, collected per
/// credential and written by one statement every [`Touches::EVERY`]: a hot credential read
/// thousands of times a second costs one row update per flush, not one per second per reader.
#[derive(Debug, Default)]
pub struct Touches(
    std::sync::Mutex<std::collections::HashMap<(Uuid, &'static str), time::OffsetDateTime>>,
);

impl Touches {
    pub const EVERY: Duration = Duration::from_millis(200);

    fn pending(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<(Uuid, &'static str), time::OffsetDateTime>,
    > {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, user: Uuid, provider: &'static str, at: time::OffsetDateTime) {
        let mut pending = self.pending();
        let t = pending.entry((user, provider)).or_insert(at);
        *t = (*t).max(at);
    }

    /// Write what is pending; on failure it stays pending (one entry per credential at most).
    pub async fn flush(&self, db: &PgPool) -> Result<(), sqlx::Error> {
        let batch: Vec<_> = self
            .pending()
            .drain()
            .map(|((u, p), at)| (u, p, at))
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        let written = creds::touch_checked_many(db, &batch).await;
        if written.is_err() {
            for (u, p, at) in batch {
                self.add(u, p, at);
            }
        }
        written
    }

    /// Flush every [`Touches::EVERY`] until the last gateway holding `touches` is gone.
    pub async fn flush_loop(db: PgPool, touches: std::sync::Weak<Touches>) {
        crate::store::tick_while_alive(Self::EVERY, touches, |touches| {
            let db = db.clone();
            async move {
                if let Err(e) = touches.flush(&db).await {
                    tracing::debug!(error = %e, "could not refresh checked_at");
                }
            }
        })
        .await;
    }
}

impl Gateway {
    /// The gateway of one actix worker: its own database pool (of `pool_size` connections) and
    /// Leaf connection pool, on that worker's runtime; keys, token, rate limit and breaker shared.
    pub fn for_worker(&self, pool_size: u32) -> Gateway {
        let db = crate::store::sibling(&self.db, pool_size);
        Gateway {
            reads: ConnStash::spawn(db.clone(), pool_size),
            creates: Arc::new(creds::CreateWrites::new(db.clone())),
            db,
            keyring: self.keyring.clone(),
            leaf: Arc::new(self.leaf.for_worker()),
            outbox_grace: self.outbox_grace,
            touches: self.touches.clone(),
            rows: self.rows.clone(),
        }
    }
}

/// Who asks, for the audit trail and Leaf's logs.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub sub: &'a str,
    pub request_id: &'a str,
}

/// Where an answer came from (`X-Credsync-Source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Leaf,
    Cache,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Leaf => "leaf",
            Source::Cache => "cache",
        }
    }
}

/// The result of a create.
pub enum Created {
    /// Leaf took it (201).
    Synced(View),
    /// Queued in the outbox (202).
    Pending(View),
}

/// The result of a delete.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    Done,
    Pending,
}

/// Leaf's answer about a credential, split into what is stored in clear and what is sealed.
pub struct LeafCredential {
    pub id: Option<Uuid>,
    pub status: Option<String>,
    pub created_time: Option<time::OffsetDateTime>,
    pub public: Map<String, Value>,
    pub secrets: SecretFields,
}

impl LeafCredential {
    pub fn parse(provider: &Provider, answer: Map<String, Value>) -> LeafCredential {
        let mut out = LeafCredential::empty();
        for (k, v) in answer {
            out.take(provider, std::borrow::Cow::Owned(k), v);
        }
        out
    }

    fn empty() -> LeafCredential {
        LeafCredential {
            id: None,
            status: None,
            created_time: None,
            public: Map::new(),
            secrets: SecretFields::default(),
        }
    }

    /// One field of Leaf's answer; a repeated key counts as its last occurrence.
    fn take(&mut self, provider: &Provider, key: std::borrow::Cow<'_, str>, v: Value) {
        match &*key {
            "id" => self.id = v.as_str().and_then(|s| Uuid::try_parse(s).ok()),
            "status" => {
                self.status = match v {
                    Value::String(s) => Some(s),
                    _ => None,
                }
            }
            "createdTime" => self.created_time = v.as_str().and_then(crate::timefmt::parse_lenient),
            // credsync's own fields are never taken from upstream.
            "syncState" | "updatedAt" => {}
            k if provider.is_secret(k) => match v {
                Value::String(s) => self.secrets.insert(k, SecretString::from(s)),
                _ => {
                    self.secrets.0.remove(k);
                }
            },
            _ => {
                self.public.insert(key.into_owned(), v);
            }
        }
    }

    /// Leaf's answer parsed straight from its body, as [`LeafCredential::parse`] reads the same
    /// body parsed into a map (a property test holds the two equal), without building that
    /// map first. `None` when the body is not one JSON object that
    /// [`crate::leaf::is_credential_answer`].
    pub fn from_body(provider: &Provider, body: &[u8]) -> Option<LeafCredential> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let out = serde::de::DeserializeSeed::deserialize(AnswerSeed(provider), &mut de).ok()?;
        de.end().ok()?;
        Some(out)
    }
}

/// A key of Leaf's answer, borrowed from the body unless it holds an escape.
struct AnswerKey<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for AnswerKey<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AnswerKey<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(AnswerKey(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(AnswerKey(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(AnswerKey(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

struct AnswerSeed<'p>(&'p Provider);

impl<'de> serde::de::DeserializeSeed<'de> for AnswerSeed<'_> {
    type Value = LeafCredential;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<LeafCredential, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for AnswerSeed<'_> {
    type Value = LeafCredential;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    /// Field by field, as `parse` takes them from a map.
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<LeafCredential, A::Error> {
        let mut out = LeafCredential::empty();
        let mut fields = 0;
        let mut status_ok = true;
        while let Some(AnswerKey(key)) = map.next_key()? {
            let v: Value = map.next_value()?;
            // Judged as the map would be: only whether there are members counts, and a repeated
            // `status` by its last value.
            fields += 1;
            if key == "status" {
                status_ok = crate::leaf::is_credential_answer(1, Some(&v));
            }
            out.take(self.0, key, v);
        }
        if !status_ok || !crate::leaf::is_credential_answer(fields, None) {
            return Err(serde::de::Error::custom(
                "not Leaf's answer about a credential",
            ));
        }
        Ok(out)
    }
}

/// A stored row's secrets, already opened (`None`: the row holds none).
struct Opened(Option<SecretFields>);

/// The secrets a credential view is made from.
pub enum ViewSecrets {
    /// Opened from the row (`None`: it holds none).
    Opened(Option<SecretFields>),
    /// A cached row's marks (never for a view that reveals: those are read from the row).
    Cached(Arc<Cached>),
}

/// The held secrets with Leaf's echoed ones over them (Leaf may add some, e.g. `accessToken`).
fn merge(held: Option<&SecretFields>, echoed: &SecretFields) -> SecretFields {
    let mut merged = SecretFields::default();
    for (k, v) in held.into_iter().flat_map(|h| &h.0).chain(&echoed.0) {
        merged.insert(k, v.clone());
    }
    merged
}

/// Whether every secret Leaf echoed equals the one held (an empty echo matches).
fn echo_matches(held: &SecretFields, echoed: &SecretFields) -> bool {
    echoed.0.iter().all(|(k, v)| {
        held.get(k).is_some_and(|old| {
            crate::crypto::ct_eq(old.expose_secret().as_bytes(), v.expose_secret().as_bytes())
        })
    })
}

impl LeafCredential {
    /// What is stored of this answer, with the secrets resealed when `sealed`.
    fn state<'a>(&'a self, sealed: Option<&'a crate::crypto::Sealed>) -> LeafState<'a> {
        LeafState {
            leaf_credential_id: self.id,
            status: self.status.as_deref(),
            created_time: self.created_time,
            public: &self.public,
            sealed,
        }
    }
}

/// Whether Leaf's answer says nothing new about a SYNCED row (status, ids, public fields).
fn unchanged(row: &CredentialRow, leaf: &LeafCredential) -> bool {
    row.state() == SyncState::Synced
        && leaf
            .status
            .as_deref()
            .is_none_or(|s| row.status.as_deref() == Some(s))
        && leaf.id.is_none_or(|id| row.leaf_credential_id == Some(id))
        && leaf
            .created_time
            .is_none_or(|t| row.created_time == Some(t))
        && leaf
            .public
            .iter()
            .all(|(k, v)| row.public_fields.0.get(k) == Some(v))
}

fn binding<'a>(user: &'a Uuid, provider: &'a Provider) -> Binding<'a> {
    Binding {
        leaf_user_id: user,
        provider: provider.name,
    }
}

impl Gateway {
    fn open(
        &self,
        provider: &Provider,
        row: &CredentialRow,
    ) -> Result<Option<SecretFields>, ApiError> {
        match row.sealed() {
            None => Ok(None),
            Some(sealed) => self
                .keyring
                .open(binding(&row.leaf_user_id, provider), &sealed)
                .map(Some)
                .map_err(|e| {
                    ApiError::Internal(anyhow::anyhow!("cannot open the stored credential: {e}"))
                }),
        }
    }

    /// The credential view of a stored row, secrets redacted.
    fn view_of(&self, provider: &Provider, row: CredentialRow) -> Result<View, ApiError> {
        let secrets = self.open(provider, &row)?;
        Ok(View {
            row,
            secrets: ViewSecrets::Opened(secrets),
            reveal: false,
        })
    }

    /// The caller's error for Leaf's answer `e` about a credential whose stored secrets are
    /// `sealed`: Leaf's own text (a 400/404/409/422 passed on) with every one of them masked, as
    /// a create's are (SPEC §4: error bodies never echo secret values). Only opened for that.
    fn refusal(
        &self,
        provider: &Provider,
        user: Uuid,
        sealed: Option<&crate::crypto::Sealed>,
        e: LeafError,
    ) -> ApiError {
        let opened = match (&e, sealed) {
            (LeafError::Rejected { .. }, Some(sealed)) => {
                self.keyring.open(binding(&user, provider), sealed).ok()
            }
            _ => None,
        };
        let secrets: Vec<&str> = opened
            .iter()
            .flat_map(|o| o.0.values().map(|v| v.expose_secret()))
            .collect();
        e.into_api_error(&secrets)
    }

    /// Merge Leaf's echoed secrets over the stored ones; `None` when nothing changed.
    fn reseal(
        &self,
        provider: &Provider,
        user: Uuid,
        stored: Option<&SecretFields>,
        echoed: &SecretFields,
    ) -> Result<Option<crate::crypto::Sealed>, ApiError> {
        let unchanged = stored.is_some_and(|s| echo_matches(s, echoed));
        if unchanged || (stored.is_none() && echoed.0.is_empty()) {
            return Ok(None);
        }
        self.seal(provider, user, &merge(stored, echoed)).map(Some)
    }

    fn seal(
        &self,
        provider: &Provider,
        user: Uuid,
        secrets: &SecretFields,
    ) -> Result<crate::crypto::Sealed, ApiError> {
        self.keyring
            .seal(binding(&user, provider), secrets)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot seal: {e}")))
    }

    /// Whether Leaf's answer says nothing new about the stored `row` (nothing to write): then
    /// the row's secrets, opened to compare them with Leaf's echo (the view needs them too).
    fn confirms(
        &self,
        provider: &Provider,
        row: &CredentialRow,
        leaf: &LeafCredential,
    ) -> Result<Option<Opened>, ApiError> {
        if !unchanged(row, leaf) {
            return Ok(None);
        }
        let stored = self.open(provider, row)?;
        let same = match &stored {
            Some(stored) => echo_matches(stored, &leaf.secrets),
            None => leaf.secrets.0.is_empty(),
        };
        Ok(same.then_some(Opened(stored)))
    }

    /// The row Leaf confirmed, `checkedAt` now. Nothing is written but `checkedAt`, at most
    /// once a second per credential, batched off the request path ([`Touches`]); a sync sets it
    /// when it releases the credential.
    fn confirmed(
        &self,
        provider: &Provider,
        row: &CredentialRow,
        source: StatusSource,
    ) -> CredentialRow {
        let now = time::OffsetDateTime::now_utc();
        if !matches!(source, StatusSource::Sync)
            && row
                .checked_at
                .is_none_or(|t| now - t > time::Duration::SECOND)
        {
            self.touches.add(row.leaf_user_id, provider.name, now);
            self.rows.confirmed_at(row.leaf_user_id, provider.name, now);
        }
        let mut row = row.clone();
        row.checked_at = Some(now);
        row
    }

    /// Store what Leaf answered for a credential (status, mapping, echoed secrets), adopting it
    /// when credsync did not track it yet (`existing` is `None`). Returns the stored row; `None`
    /// when the row's delete is pending, it was rejected, or it was deleted since `existing`
    /// was read.
    pub async fn apply_leaf_answer(
        &self,
        provider: &Provider,
        user: Uuid,
        existing: Option<&CredentialRow>,
        answer: Map<String, Value>,
        source: StatusSource,
        actor: Actor<'_>,
    ) -> Result<Option<CredentialRow>, ApiError> {
        let leaf = LeafCredential::parse(provider, answer);
        self.apply_leaf_credential(provider, user, existing, leaf, source, actor)
            .await
    }

    async fn apply_leaf_credential(
        &self,
        provider: &Provider,
        user: Uuid,
        existing: Option<&CredentialRow>,
        leaf: LeafCredential,
        source: StatusSource,
        actor: Actor<'_>,
    ) -> Result<Option<CredentialRow>, ApiError> {
        if let Some(row) = existing
            && self.confirms(provider, row, &leaf)?.is_some()
        {
            return Ok(Some(self.confirmed(provider, row, source)));
        }
        let stored = match existing {
            Some(row) => self.open(provider, row)?,
            None => None,
        };
        let sealed = self.reseal(provider, user, stored.as_ref(), &leaf.secrets)?;
        let state = leaf.state(sealed.as_ref());
        let adopt = existing.is_none();
        let stored =
            creds::store_leaf_state(&self.db, user, provider.name, &state, source, adopt).await;
        // This process's next read must not wait for the trigger's notice.
        self.rows.invalidate(user);
        let Some(refreshed) = stored? else {
            return Ok(None);
        };
        if refreshed.adopted {
            audit::record_logged(
                &self.db,
                &Entry {
                    actor: actor.sub,
                    action: "credential.adopted",
                    leaf_user_id: Some(user),
                    provider: Some(provider.name),
                    outcome: Outcome::Success,
                    request_id: Some(actor.request_id),
                    detail: Some("credential found at Leaf; now tracked"),
                },
            )
            .await;
        }
        Ok(Some(refreshed.row))
    }

    async fn audit(
        &self,
        actor: Actor<'_>,
        action: &str,
        user: Uuid,
        provider: &Provider,
        outcome: Outcome,
        detail: Option<&str>,
    ) {
        audit::record_logged(
            &self.db,
            &Entry {
                actor: actor.sub,
                action,
                leaf_user_id: Some(user),
                provider: Some(provider.name),
                outcome,
                request_id: Some(actor.request_id),
                detail,
            },
        )
        .await;
    }

    /// Leaf says the credential does not exist: a SYNCED local copy is destroyed (audited).
    async fn vanish(
        &self,
        provider: &Provider,
        user: Uuid,
        row: Option<&CredentialRow>,
        actor: Actor<'_>,
    ) -> Result<(), ApiError> {
        if let Some(row) = row
            && row.state() == SyncState::Synced
        {
            let purged = creds::purge(&self.db, user, provider.name).await;
            self.rows.invalidate(user);
            purged?;
            self.audit(
                actor,
                "credential.vanished",
                user,
                provider,
                Outcome::Success,
                Some("Leaf no longer has this credential"),
            )
            .await;
        }
        Ok(())
    }

    /// POST: store, forward, reconcile.
    pub async fn create(
        &self,
        provider: &Provider,
        user: Uuid,
        body: &CreateBody,
        actor: Actor<'_>,
    ) -> Result<Created, ApiError> {
        let sealed = self
            .keyring
            .seal(binding(&user, provider), &body.secrets)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot seal: {e}")))?;
        let pending = match self
            .creates
            .insert_pending(creds::NewCredential {
                user,
                provider: provider.name,
                public: body.public.clone(),
                sealed,
                actor: actor.sub.to_owned(),
                request_id: actor.request_id.to_owned(),
                grace: self.outbox_grace,
            })
            .await?
        {
            Ok(pending) => pending,
            Err(creds::CreateConflict::Exists) => {
                return Err(ApiError::Conflict(
                    "a credential already exists for this user; delete it first".into(),
                ));
            }
            Err(creds::CreateConflict::DeletePending) => {
                return Err(ApiError::Conflict(
                    "the previous credential's delete has not reached Leaf yet; retry once it has"
                        .into(),
                ));
            }
        };
        let request = leaf_create_body(provider, body);
        let answer = self
            .leaf
            .create_credential_body(provider, user, request, actor.request_id)
            .await
            .and_then(|body| {
                LeafCredential::from_body(provider, &body)
                    .ok_or(LeafError::Unavailable(crate::leaf::Unavailable::Garbage))
            });
        match answer {
            Ok(leaf) => {
                // The common case: settle the pending row in one statement, sealing what Leaf
                // added to the secrets (from the plaintext at hand: nothing to decrypt).
                let merged = (!echo_matches(&body.secrets, &leaf.secrets))
                    .then(|| merge(Some(&body.secrets), &leaf.secrets));
                let sealed = merged
                    .as_ref()
                    .map(|m| self.seal(provider, user, m))
                    .transpose()?;
                if let Some(row) = self
                    .creates
                    .settle_create(creds::Settle {
                        user,
                        provider: provider.name,
                        leaf_credential_id: leaf.id,
                        status: leaf.status.clone(),
                        created_time: leaf.created_time,
                        public: leaf.public.clone(),
                        sealed,
                        actor: actor.sub.to_owned(),
                        request_id: actor.request_id.to_owned(),
                        pending,
                    })
                    .await?
                {
                    // The caller's secrets, copied for the view, when Leaf added none.
                    let secrets = merged
                        .unwrap_or_else(|| merge(Some(&body.secrets), &SecretFields::default()));
                    return Ok(Created::Synced(View {
                        row,
                        secrets: ViewSecrets::Opened(Some(secrets)),
                        reveal: false,
                    }));
                }
                // Not settled here: the worker delivered it meanwhile, or a DELETE came first.
                let stored = match creds::get(&self.db, user, provider.name).await? {
                    Some(existing) => {
                        self.apply_leaf_credential(
                            provider,
                            user,
                            Some(&existing),
                            leaf,
                            StatusSource::Request,
                            actor,
                        )
                        .await?
                    }
                    None => None,
                };
                let Some(row) = stored else {
                    return Err(self
                        .deleted_while_created(provider, user, actor, false)
                        .await?);
                };
                self.audit(
                    actor,
                    "credential.create",
                    user,
                    provider,
                    Outcome::Success,
                    None,
                )
                .await;
                Ok(Created::Synced(self.view_of(provider, row)?))
            }
            Err(e) if e.is_unavailable() => {
                creds::release_outbox(&self.db, user, provider.name, e.retry_after()).await?;
                // A DELETE answered meanwhile: Leaf may have created it all the same (a timeout).
                let row = match creds::get(&self.db, user, provider.name).await? {
                    Some(row) if row.state() != SyncState::DeletePending => row,
                    _ => {
                        return Err(self
                            .deleted_while_created(provider, user, actor, true)
                            .await?);
                    }
                };
                self.audit(
                    actor,
                    "credential.create",
                    user,
                    provider,
                    Outcome::Success,
                    Some("queued: Leaf unavailable"),
                )
                .await;
                Ok(Created::Pending(self.view_of(provider, row)?))
            }
            Err(e) => {
                creds::remove(&self.db, user, provider.name).await?;
                let secrets: Vec<&str> = body.secret_values().collect();
                let err = e.into_api_error(&secrets);
                let detail = mask_secrets(&err.to_string(), secrets.iter().copied());
                self.audit(
                    actor,
                    "credential.create",
                    user,
                    provider,
                    Outcome::Failure,
                    Some(&detail),
                )
                .await;
                Err(err)
            }
        }
    }

    /// A create that Leaf took while a DELETE of the same credential was answered: the caller's
    /// delete wins, so Leaf's new copy is deleted too (queued for the worker, unless the user's
    /// record is a pending delete already, which does it). When Leaf did not answer the create
    /// (`unanswered`: a timeout, a reset), it may still act on it: the delete waits as long as a
    /// request is held to be in flight (`outbox_grace`), so that it does not reach Leaf first.
    /// The create's answer: 409.
    pub async fn deleted_while_created(
        &self,
        provider: &Provider,
        user: Uuid,
        actor: Actor<'_>,
        unanswered: bool,
    ) -> Result<ApiError, sqlx::Error> {
        let delay = if unanswered {
            self.outbox_grace
        } else {
            Duration::ZERO
        };
        let queued = creds::queue_orphan_delete(
            &self.db,
            user,
            provider.name,
            actor.sub,
            actor.request_id,
            delay,
        )
        .await?;
        self.rows.invalidate(user);
        tracing::info!(leaf_user_id = %user, queued, "credential deleted while Leaf created it; Leaf's copy is deleted too");
        self.audit(
            actor,
            "credential.create",
            user,
            provider,
            Outcome::Failure,
            Some("deleted while it was being created; Leaf's copy is deleted too"),
        )
        .await;
        Ok(ApiError::Conflict(
            "the credential was deleted while it was being created".into(),
        ))
    }

    /// Refuse reads of a credential whose delete is pending or that Leaf rejected.
    fn refuse_gone(row: &CredentialRow) -> Result<(), ApiError> {
        Self::refuse_state(
            row.state(),
            row.rejection_status,
            row.rejection_detail.as_deref(),
        )
    }

    fn refuse_state(
        state: SyncState,
        rejection_status: Option<i32>,
        rejection_detail: Option<&str>,
    ) -> Result<(), ApiError> {
        match state {
            SyncState::DeletePending => Err(ApiError::NotFound(
                "the credential is being deleted (delete pending at Leaf)".into(),
            )),
            SyncState::Rejected => Err(ApiError::NotFound(format!(
                "Leaf rejected this credential ({}): {}",
                rejection_status.unwrap_or_default(),
                rejection_detail.unwrap_or("no detail")
            ))),
            _ => Ok(()),
        }
    }

    /// GET the credential (forwarded; the cache when Leaf is unavailable, or when `cache_only`).
    pub async fn get(
        &self,
        provider: &Provider,
        user: Uuid,
        reveal: bool,
        cache_only: bool,
        actor: Actor<'_>,
    ) -> Result<(View, Source), ApiError> {
        let (row, source, opened) = if cache_only {
            let row = self
                .local_row(provider, user)
                .await?
                .ok_or_else(|| ApiError::NotFound("no credential for this user".into()))?;
            Self::refuse_gone(&row)?;
            (row, Source::Cache, None)
        } else {
            self.read_through(provider, user, reveal, actor).await?
        };
        let secrets = match opened {
            Some(Shown::Opened(Opened(secrets))) => ViewSecrets::Opened(secrets),
            Some(Shown::Cached(cached)) => ViewSecrets::Cached(cached),
            None => ViewSecrets::Opened(self.open(provider, &row)?),
        };
        let view = View {
            row,
            secrets,
            reveal,
        };
        if reveal {
            self.audit(
                actor,
                "credential.reveal",
                user,
                provider,
                Outcome::Success,
                None,
            )
            .await;
        }
        Ok((view, source))
    }

    /// The credential's row, read on a kept connection ([`ConnStash`]): the read that starts
    /// every forwarded GET, `/status` and `/events`.
    async fn local_row(
        &self,
        provider: &Provider,
        user: Uuid,
    ) -> Result<Option<CredentialRow>, sqlx::Error> {
        let mut read = self.reads.acquire().await?;
        let row = creds::get(read.conn(), user, provider.name).await?;
        read.keep();
        Ok(row)
    }

    /// Read the credential from Leaf and refresh the local copy, or fall back to the local copy.
    ///
    /// A row held in the row cache ([`RowCache`]) that Leaf's answer confirms is answered
    /// without reading the row (never for `reveal`: a revealed secret is always read from
    /// Postgres). Any other answer from Leaf is decided on a fresh read of the row.
    async fn read_through(
        &self,
        provider: &Provider,
        user: Uuid,
        reveal: bool,
        actor: Actor<'_>,
    ) -> Result<(CredentialRow, Source, Option<Shown>), ApiError> {
        let ticket = self.rows.ticket();
        let cached = if reveal || ticket.is_none() {
            None
        } else {
            self.rows.get(user, provider.name)
        };
        if ticket.is_some() {
            let result = if cached.is_some() { "hit" } else { "miss" };
            metrics::counter!("credsync_row_cache_total", "result" => result).increment(1);
        }
        let (local, upstream) = match cached {
            Some(cached) => {
                let upstream = self.leaf_credential(provider, user, actor).await;
                if let Ok(Some(leaf)) = &upstream
                    && unchanged(&cached.row, leaf)
                    && self.rows.echo_matches(&cached, &leaf.secrets)
                {
                    let row = self.confirmed(provider, &cached.row, StatusSource::Request);
                    return Ok((row, Source::Leaf, Some(Shown::Cached(cached))));
                }
                (self.local_row(provider, user).await?, Some(upstream))
            }
            None => (self.local_row(provider, user).await?, None),
        };
        if let Some(row) = &local {
            Self::refuse_gone(row)?;
            if row.state() == SyncState::PendingUpstream {
                return Ok((row.clone(), Source::Cache, None));
            }
        }
        let upstream = match upstream {
            Some(upstream) => upstream,
            None => self.leaf_credential(provider, user, actor).await,
        };
        match upstream {
            Ok(Some(leaf)) => {
                if let Some(row) = &local
                    && let Some(opened) = self.confirms(provider, row, &leaf)?
                {
                    self.rows
                        .fill(ticket, provider.name, row, opened.0.as_ref());
                    let row = self.confirmed(provider, row, StatusSource::Request);
                    return Ok((row, Source::Leaf, Some(Shown::Opened(opened))));
                }
                let row = self
                    .apply_leaf_credential(
                        provider,
                        user,
                        local.as_ref(),
                        leaf,
                        StatusSource::Request,
                        actor,
                    )
                    .await?
                    .ok_or_else(|| {
                        ApiError::NotFound(
                            "the credential is being deleted (delete pending at Leaf)".into(),
                        )
                    })?;
                Ok((row, Source::Leaf, None))
            }
            Ok(None) => {
                self.vanish(provider, user, local.as_ref(), actor).await?;
                Err(ApiError::NotFound("no credential for this user".into()))
            }
            Err(e) if e.is_unavailable() => match local {
                Some(row) => Ok((row, Source::Cache, None)),
                None => Err(e.into_api_error(&[])),
            },
            Err(e) => {
                let sealed = local.as_ref().and_then(CredentialRow::sealed);
                Err(self.refusal(provider, user, sealed.as_ref(), e))
            }
        }
    }

    /// Leaf's answer to a GET of the credential, parsed.
    async fn leaf_credential(
        &self,
        provider: &Provider,
        user: Uuid,
        actor: Actor<'_>,
    ) -> Result<Option<LeafCredential>, LeafError> {
        match self
            .leaf
            .get_credential_body(provider, user, actor.request_id)
            .await?
        {
            Some(body) => LeafCredential::from_body(provider, &body)
                .map(Some)
                .ok_or(LeafError::Unavailable(crate::leaf::Unavailable::Garbage)),
            None => Ok(None),
        }
    }

    /// The cached status, or Leaf's (read from its GET answer).
    pub async fn status(
        &self,
        provider: &Provider,
        user: Uuid,
        cache_only: bool,
        actor: Actor<'_>,
    ) -> Result<(Value, Source), ApiError> {
        let (status, checked_at, source) = if cache_only {
            let mut read = self.reads.acquire().await?;
            let row = creds::cached_status(read.conn(), user, provider.name).await?;
            read.keep();
            let row =
                row.ok_or_else(|| ApiError::NotFound("no credential for this user".into()))?;
            Self::refuse_state(
                SyncState::parse(&row.sync_state).unwrap_or(SyncState::Synced),
                row.rejection_status,
                row.rejection_detail.as_deref(),
            )?;
            (row.status, row.checked_at, Source::Cache)
        } else {
            let (row, source, _) = self.read_through(provider, user, false, actor).await?;
            (row.status, row.checked_at, source)
        };
        Ok((
            json!({
                "status": status,
                "checkedAt": checked_at.map(crate::timefmt::format),
            }),
            source,
        ))
    }

    /// A page of events, Leaf-shaped, merged into the cache; the cache when Leaf is unavailable.
    pub async fn events(
        &self,
        provider: &Provider,
        user: Uuid,
        page: u32,
        size: u32,
        ascending: bool,
        cache_only: bool,
        actor: Actor<'_>,
    ) -> Result<(Vec<Event>, i64, Source), ApiError> {
        let local = self.local_row(provider, user).await?;
        if let Some(row) = &local {
            Self::refuse_gone(row)?;
            if row.state() == SyncState::PendingUpstream {
                return Ok((Vec::new(), 0, Source::Cache));
            }
        }
        let from_cache = || async {
            let (ev, total) =
                events::page(&self.db, user, provider.name, page, size, ascending).await?;
            Ok::<_, ApiError>((ev, total, Source::Cache))
        };
        if cache_only {
            if local.is_none() {
                return Err(ApiError::NotFound("no credential for this user".into()));
            }
            return from_cache().await;
        }
        match self
            .leaf
            .events(provider, user, page, size, ascending, actor.request_id)
            .await
        {
            Ok(Some((mut list, total))) => {
                if local.is_some() {
                    events::upsert(&self.db, user, provider.name, &list).await?;
                }
                sort_events(&mut list, ascending);
                let total = total.unwrap_or(list.len() as i64);
                Ok((list, total, Source::Leaf))
            }
            Ok(None) => {
                self.vanish(provider, user, local.as_ref(), actor).await?;
                Err(ApiError::NotFound("no credential for this user".into()))
            }
            Err(e) if e.is_unavailable() && local.is_some() => from_cache().await,
            Err(e) => {
                let sealed = local.as_ref().and_then(CredentialRow::sealed);
                Err(self.refusal(provider, user, sealed.as_ref(), e))
            }
        }
    }

    /// DELETE: shred at once, then forward; queue when Leaf is unavailable.
    pub async fn delete(
        &self,
        provider: &Provider,
        user: Uuid,
        actor: Actor<'_>,
    ) -> Result<Deleted, ApiError> {
        let before = creds::begin_delete(
            &self.db,
            user,
            provider.name,
            actor.sub,
            actor.request_id,
            self.outbox_grace,
        )
        .await;
        // Shredded (or nothing to shred): this process's next read asks Postgres again.
        self.rows.invalidate(user);
        let before = before?;
        let had_local = before.is_some();
        match self
            .leaf
            .delete_credential(provider, user, actor.request_id)
            .await
        {
            Ok(existed) => {
                if before.is_some() {
                    creds::purge(&self.db, user, provider.name).await?;
                }
                if existed || had_local {
                    self.audit(
                        actor,
                        "credential.delete",
                        user,
                        provider,
                        Outcome::Success,
                        None,
                    )
                    .await;
                    Ok(Deleted::Done)
                } else {
                    Err(ApiError::NotFound("no credential for this user".into()))
                }
            }
            Err(e) if e.is_unavailable() => {
                let retry_after = e.retry_after();
                if before.is_none() {
                    creds::queue_delete(
                        &self.db,
                        user,
                        provider.name,
                        actor.sub,
                        actor.request_id,
                        retry_after,
                    )
                    .await?;
                } else {
                    creds::release_outbox(&self.db, user, provider.name, retry_after).await?;
                }
                self.audit(
                    actor,
                    "credential.delete",
                    user,
                    provider,
                    Outcome::Success,
                    Some("queued: Leaf unavailable"),
                )
                .await;
                Ok(Deleted::Pending)
            }
            Err(e) => {
                if before.is_some() {
                    creds::purge(&self.db, user, provider.name).await?;
                }
                let sealed = before.and_then(|(_, sealed)| sealed);
                let err = self.refusal(provider, user, sealed.as_ref(), e);
                self.audit(
                    actor,
                    "credential.delete",
                    user,
                    provider,
                    Outcome::Failure,
                    Some(&err.to_string()),
                )
                .await;
                Err(err)
            }
        }
    }
}

/// Leaf's create body: the public fields and the secrets, in a buffer wiped after sending.
pub fn leaf_create_body(provider: &Provider, body: &CreateBody) -> Zeroizing<Vec<u8>> {
    leaf_create_body_from(provider, &body.public, &body.secrets)
}

/// Leaf's create body from stored parts (the outbox drain).
pub fn leaf_create_body_from(
    provider: &Provider,
    public: &Map<String, Value>,
    secrets: &SecretFields,
) -> Zeroizing<Vec<u8>> {
    let mut fields: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for f in provider.create_fields {
        let v = if f.secret {
            secrets.get(f.name).map(|s| s.expose_secret())
        } else {
            public.get(f.name).and_then(Value::as_str)
        };
        if let Some(v) = v {
            fields.insert(f.name, v);
        }
    }
    crate::domain::credential::json_object(fields.iter().map(|(k, v)| (*k, *v)))
}

fn sort_events(list: &mut [Event], ascending: bool) {
    list.sort_by(|a, b| {
        let o = a
            .created_date
            .cmp(&b.created_date)
            .then_with(|| a.id.cmp(&b.id));
        if ascending { o } else { o.reverse() }
    });
}

/// What a credential view (SPEC §5) is made of: the row, its opened secrets, and whether they
/// are shown in full (`reveal`) or redacted.
pub struct View {
    pub row: CredentialRow,
    pub secrets: ViewSecrets,
    pub reveal: bool,
}

impl View {
    /// What the view shows of the secret field `name`: its value when revealed, else its
    /// redacted form; `None` when the credential holds no such field.
    pub fn shown(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        match &self.secrets {
            ViewSecrets::Opened(secrets) => {
                let value = secrets.as_ref()?.get(name)?.expose_secret();
                Some(if self.reveal {
                    value.into()
                } else {
                    redact(value).into()
                })
            }
            ViewSecrets::Cached(cached) => {
                debug_assert!(!self.reveal, "a revealing view is made from the row");
                cached.secrets.as_ref()?.redacted(name).map(Into::into)
            }
        }
    }

    pub fn to_value(&self, provider: &Provider) -> Value {
        match &self.secrets {
            ViewSecrets::Opened(secrets) => {
                credential_view(provider, &self.row, secrets.as_ref(), self.reveal)
            }
            ViewSecrets::Cached(_) => {
                let mut value = credential_view(provider, &self.row, None, false);
                for name in provider.secret_fields() {
                    if let Some(shown) = self.shown(name) {
                        value[name] = Value::String(shown.into_owned());
                    }
                }
                value
            }
        }
    }
}

/// The secrets a read answers with: opened from the row, or a cached row's marks.
enum Shown {
    Opened(Opened),
    Cached(Arc<Cached>),
}

/// The `scopes` of a credential view: Leaf's `tokenMetadata.scopes`, else its `scopes`, when
/// that is an array (`None`: an empty array is shown).
pub fn view_scopes(public: &Map<String, Value>) -> Option<&Value> {
    public
        .get("tokenMetadata")
        .and_then(|m| m.get("scopes"))
        .or_else(|| public.get("scopes"))
        .filter(|v| v.is_array())
}

/// The credential view (SPEC §5): a superset of Leaf's answer and of the older page's form.
/// The forwarded GET writes the same view straight into its body (`http::credentials`); a
/// property test holds the two equal.
pub fn credential_view(
    provider: &Provider,
    row: &CredentialRow,
    secrets: Option<&SecretFields>,
    reveal: bool,
) -> Value {
    let public = &row.public_fields.0;
    let mut out = Map::new();
    out.insert(
        "id".into(),
        row.leaf_credential_id
            .map_or(Value::Null, |id| Value::String(id.to_string())),
    );
    out.insert(
        "status".into(),
        row.status.clone().map_or(Value::Null, Value::String),
    );
    out.insert(
        "createdTime".into(),
        row.created_time
            .map_or(Value::Null, |t| Value::String(crate::timefmt::format(t))),
    );
    for f in provider.create_fields.iter().filter(|f| !f.secret) {
        out.insert(
            f.name.into(),
            public.get(f.name).cloned().unwrap_or(Value::Null),
        );
    }
    for name in provider.secret_fields() {
        let v = secrets.and_then(|s| s.get(name)).map_or(Value::Null, |s| {
            Value::String(if reveal {
                s.expose_secret().to_owned()
            } else {
                redact(s.expose_secret())
            })
        });
        out.insert(name.into(), v);
    }
    let scopes = view_scopes(public)
        .cloned()
        .unwrap_or_else(|| Value::Array(Vec::new()));
    out.insert("scopes".into(), scopes.clone());
    out.insert("tokenMetadata".into(), json!({ "scopes": scopes }));
    out.insert("syncState".into(), Value::String(row.sync_state.clone()));
    out.insert(
        "updatedAt".into(),
        Value::String(crate::timefmt::format(row.updated_at)),
    );
    Value::Object(out)
}

/// Whether a Leaf error on a worker retry of a create means "already there".
pub fn is_conflict(e: &LeafError) -> bool {
    matches!(e, LeafError::Rejected { status: 409, .. })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::provider::CLIMATE_FIELD_VIEW;

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "id",
                "status",
                "createdTime",
                "syncState",
                "updatedAt",
                "clientId",
                "clientSecret",
                "apiKey",
                "refreshToken",
                "accessToken",
                "scopes",
                "tokenMetadata",
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z]{1,8}",
            // The same names written with an escape: the key cannot be borrowed from the body.
            Just(r"client\u0049d".to_owned()),
            Just(r"acc\u0065ssToken".to_owned()),
            Just(r"st\u0061tus".to_owned()),
        ]
    }

    fn arb_value() -> impl Strategy<Value = String> {
        let scalar = prop_oneof![
            Just("null".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            any::<u128>().prop_map(|u| format!("\"{}\"", Uuid::from_u128(u))),
            Just("\"2026-11-29T10:11:12.345Z\"".to_owned()),
            Just("\"2026-11-29 10:11:12\"".to_owned()),
            Just("\"OK\"".to_owned()),
        ];
        prop_oneof![
            4 => scalar.clone(),
            1 => prop::collection::vec(scalar.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
            1 => scalar.prop_map(|v| format!("{{\"scopes\":{v}}}")),
        ]
    }

    fn same(a: &LeafCredential, b: &LeafCredential) -> bool {
        let secrets = |c: &LeafCredential| {
            c.secrets
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.expose_secret().to_owned()))
                .collect::<Vec<_>>()
        };
        a.id == b.id
            && a.status == b.status
            && a.created_time == b.created_time
            && a.public == b.public
            && secrets(a) == secrets(b)
    }

    #[test]
    fn an_empty_object_or_a_status_that_is_not_text_is_not_leafs_answer() {
        let parse = |b: &str| LeafCredential::from_body(&CLIMATE_FIELD_VIEW, b.as_bytes());
        for refused in [r#"{}"#, r#"{"status":5}"#, r#"{"id":"x","status":{"a":1}}"#] {
            assert!(parse(refused).is_none(), "{refused}");
        }
        let c = parse(r#"{"status":null,"clientId":"c"}"#).expect("null status");
        assert_eq!(c.status, None);
        assert_eq!(c.public["clientId"], "c");
        // The older page's answer: no id, other field names.
        let c = parse(r#"{"clientKey":"k","status":"OK"}"#).expect("the older page's shape");
        assert_eq!(c.status.as_deref(), Some("OK"));
        assert_eq!(c.id, None);
    }

    proptest! {
        #[test]
        fn an_answer_parsed_from_its_body_is_the_answer_parsed_from_its_map(
            fields in prop::collection::vec((arb_key(), arb_value()), 0..14),
        ) {
            let body = format!(
                "{{{}}}",
                fields
                    .iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let map: Map<String, Value> = serde_json::from_str(&body).unwrap();
            let credential = crate::leaf::is_credential_answer(map.len(), map.get("status"));
            let expected = LeafCredential::parse(&CLIMATE_FIELD_VIEW, map);
            let direct = LeafCredential::from_body(&CLIMATE_FIELD_VIEW, body.as_bytes());
            prop_assert_eq!(direct.is_some(), credential, "{}", body);
            if let Some(direct) = direct {
                prop_assert!(same(&direct, &expected), "{}", body);
            }
        }

        #[test]
        fn a_body_that_is_not_one_credential_object_is_refused(body in prop_oneof![
            Just("{}".to_owned()),
            Just("{\"status\":5}".to_owned()),
            Just("{\"status\":5,\"status\":\"OK\"}".to_owned()),
            Just("{\"status\":\"OK\",\"status\":[]}".to_owned()),
            Just("[]".to_owned()),
            Just("null".to_owned()),
            Just("\"id\"".to_owned()),
            Just("{} {}".to_owned()),
            Just("{\"id\":".to_owned()),
            any::<String>(),
        ]) {
            let as_credential = serde_json::from_str::<Map<String, Value>>(&body)
                .is_ok_and(|m| crate::leaf::is_credential_answer(m.len(), m.get("status")));
            prop_assert_eq!(LeafCredential::from_body(&CLIMATE_FIELD_VIEW, body.as_bytes()).is_some(), as_credential);
        }
    }
}
