//! A serving process's cache of SYNCED credential rows: a forwarded read whose Leaf answer
//! confirms the cached row (same status, ids, public fields, echoed secrets) answers without
//! reading its row from Postgres.
//!
//! Owns: which rows a process may trust without a read, and for how long. Must never: hold a
//! row that is not SYNCED (every decision SPEC §5 takes on other states is taken on a fresh
//! read), hold a plaintext secret, or be trusted while the process cannot hear about changes.
//!
//! Secrets: a row keeps its sealed blobs, and beside them [`SecretMarks`], what a confirmed read
//! needs of the secrets without opening the envelope: per field a keyed digest of the value
//! (HMAC-SHA256 under a key drawn when the cache is made, held nowhere else), to tell whether
//! Leaf echoed the value held, and the redacted form every non-revealing view shows. Opening the
//! envelope on every confirmed read was 7 % of a forwarded read's instructions.
//!
//! Coherence, in three layers:
//! - every change to a SYNCED row's own fields, and every removal of one, by any process, is
//!   announced by a trigger on the channel [`CHANNEL`] (migration 0003); the listener task
//!   ([`RowCache::listen`]) drops the user's entries when the notice arrives;
//! - the gateway drops a user's entries itself before its own writes (a DELETE is refused to
//!   the next read of the same process without waiting for the notice);
//! - an entry is trusted for the TTL (`CREDSYNC_ROW_CACHE_TTL_MS`, 5 s by default) at most,
//!   which bounds what a lost notice could cost.
//!
//! A fill races with a change committed between the read and the fill: each fill carries the
//! [`Ticket`] taken before its read, and any invalidation in between (of any user) voids it.
//! While the listener is not subscribed (start-up, a lost connection) nothing is served or
//! filled, and everything held is dropped when it subscribes again.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::crypto::SecretFields;
use crate::domain::{SyncState, redact};
use crate::store::credentials::CredentialRow;

/// The channel migration 0003's trigger announces changes on: a Leaf user id, or `*` for all.
pub const CHANNEL: &str = "credsync_credential";

const SHARDS: usize = 16;

/// Entries held at most (a row is about a kilobyte): past it, fills wait for expiries.
pub const MAX_ENTRIES: usize = 65_536;

/// A user's entries (one per provider held).
type Shard = HashMap<Uuid, Vec<Entry>>;

pub struct RowCache {
    ttl: Duration,
    shards: Box<[Mutex<Shard>]>,
    /// Moves on every invalidation: a fill whose ticket is older is void.
    generation: AtomicU64,
    /// True while the listener is subscribed.
    live: AtomicBool,
    /// The key of [`SecretMarks`]' digests, ready to take a value.
    mark_key: Hmac<Sha256>,
}

struct Entry {
    provider: &'static str,
    held: Arc<Cached>,
    read_at: Instant,
}

/// A cached row and its secrets' marks (`None`: the row holds no secrets).
pub struct Cached {
    pub row: CredentialRow,
    pub secrets: Option<SecretMarks>,
}

/// A row's secrets as the cache holds them: per field, a keyed digest of the value and its
/// redacted form (see the module's notes). Never the value.
#[derive(Clone)]
pub struct SecretMarks(Vec<Mark>);

#[derive(Clone)]
struct Mark {
    name: String,
    digest: [u8; 32],
    redacted: String,
}

impl SecretMarks {
    /// The redacted form of the field `name`, as a view that does not reveal shows it.
    pub fn redacted(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.redacted.as_str())
    }
}

/// The cache's generation before a read: see [`RowCache::fill`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl RowCache {
    /// A cache trusting entries for `ttl` (zero: a cache that never holds anything). It serves
    /// nothing until [`RowCache::listen`] has subscribed.
    pub fn new(ttl: Duration) -> RowCache {
        RowCache {
            ttl,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            generation: AtomicU64::new(0),
            live: AtomicBool::new(false),
            mark_key: Hmac::new_from_slice(&rand::random::<[u8; 32]>())
                .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length")),
        }
    }

    fn digest(&self, value: &str) -> Hmac<Sha256> {
        let mut mac = self.mark_key.clone();
        mac.update(value.as_bytes());
        mac
    }

    pub(crate) fn marks(&self, secrets: &SecretFields) -> SecretMarks {
        SecretMarks(
            secrets
                .0
                .iter()
                .map(|(name, value)| Mark {
                    name: name.clone(),
                    digest: self
                        .digest(value.expose_secret())
                        .finalize()
                        .into_bytes()
                        .into(),
                    redacted: redact(value.expose_secret()),
                })
                .collect(),
        )
    }

    /// Whether every secret Leaf echoed is the one `held` holds (an empty echo matches): what
    /// `gateway::echo_matches` tells of opened secrets, told from the marks.
    pub fn echo_matches(&self, held: &Cached, echoed: &SecretFields) -> bool {
        echoed.0.iter().all(|(name, value)| {
            held.secrets
                .iter()
                .flat_map(|marks| &marks.0)
                .find(|m| m.name == *name)
                .is_some_and(|m| {
                    // Constant time, as the comparison of opened secrets.
                    self.digest(value.expose_secret())
                        .verify_slice(&m.digest)
                        .is_ok()
                })
        })
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn shard(&self, user: &Uuid) -> MutexGuard<'_, Shard> {
        let i = (user.as_u128() as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// The cached SYNCED row of `(user, provider)`, if one was read less than the TTL ago.
    pub fn get(&self, user: Uuid, provider: &str) -> Option<Arc<Cached>> {
        if !self.is_live() {
            return None;
        }
        let shard = self.shard(&user);
        let entry = shard.get(&user)?.iter().find(|e| e.provider == provider)?;
        (entry.read_at.elapsed() < self.ttl).then(|| entry.held.clone())
    }

    /// Take before reading a row that may be filled in afterwards.
    pub fn ticket(&self) -> Option<Ticket> {
        (self.enabled() && self.is_live()).then(|| Ticket(self.generation.load(Ordering::SeqCst)))
    }

    /// Hold `row` with the marks of its opened `secrets`, read after `ticket` was taken, unless
    /// anything was invalidated since (the row may predate that change) or it is not SYNCED.
    pub fn fill(
        &self,
        ticket: Option<Ticket>,
        provider: &'static str,
        row: &CredentialRow,
        secrets: Option<&SecretFields>,
    ) {
        let Some(Ticket(generation)) = ticket else {
            return;
        };
        if !self.enabled() || row.state() != SyncState::Synced || row.provider != provider {
            return;
        }
        let held = Arc::new(Cached {
            row: row.clone(),
            secrets: secrets.map(|s| self.marks(s)),
        });
        let mut shard = self.shard(&row.leaf_user_id);
        // Checked under the shard's lock: an invalidation moves the generation before it takes
        // the lock, so it either voids this fill or removes what it put here.
        if !self.is_live() || self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if shard.len() >= MAX_ENTRIES / SHARDS {
            let ttl = self.ttl;
            shard.retain(|_, entries| {
                entries.retain(|e| e.read_at.elapsed() < ttl);
                !entries.is_empty()
            });
            if shard.len() >= MAX_ENTRIES / SHARDS {
                return;
            }
        }
        let entries = shard.entry(row.leaf_user_id).or_default();
        entries.retain(|e| e.provider != provider);
        entries.push(Entry {
            provider,
            held,
            read_at: Instant::now(),
        });
    }

    /// Record in the cached row that Leaf confirmed it at `at` (its `checkedAt`), keeping the
    /// entry's age: only a read of the row renews that.
    pub fn confirmed_at(&self, user: Uuid, provider: &str, at: OffsetDateTime) {
        let mut shard = self.shard(&user);
        let Some(entry) = shard
            .get_mut(&user)
            .and_then(|es| es.iter_mut().find(|e| e.provider == provider))
        else {
            return;
        };
        let mut row = entry.held.row.clone();
        row.checked_at = Some(at);
        entry.held = Arc::new(Cached {
            row,
            secrets: entry.held.secrets.clone(),
        });
    }

    /// Drop the user's entries (every provider), and void the fills under way.
    pub fn invalidate(&self, user: Uuid) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.shard(&user).remove(&user);
    }

    /// Drop everything, and void the fills under way.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for i in 0..SHARDS {
            self.shards[i]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// Entries held (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the listener is subscribed (and the cache may serve).
    pub fn listening(&self) -> bool {
        self.is_live()
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.clear();
    }

    fn apply(&self, payload: &str) {
        match Uuid::try_parse(payload) {
            Ok(user) => self.invalidate(user),
            Err(_) => self.clear(),
        }
    }

    /// Subscribe to [`CHANNEL`] on a connection of `db` and apply every notice, for as long as
    /// the cache lives; resubscribe (after a pause) when the connection is lost, serving
    /// nothing meanwhile. Does nothing for a disabled cache.
    pub async fn listen(cache: Weak<RowCache>, db: PgPool) {
        if !cache.upgrade().is_some_and(|c| c.enabled()) {
            return;
        }
        let mut pause = Duration::from_millis(100);
        loop {
            let subscribed = async {
                let mut listener = PgListener::connect_with(&db).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            }
            .await;
            match subscribed {
                Ok(mut listener) => {
                    pause = Duration::from_millis(100);
                    let Some(c) = cache.upgrade() else { return };
                    c.set_live(true);
                    drop(c);
                    loop {
                        let next = listener.try_recv().await;
                        let Some(c) = cache.upgrade() else { return };
                        match next {
                            Ok(Some(notice)) => c.apply(notice.payload()),
                            // Reconnected and subscribed again: what was announced in between
                            // is lost, so nothing held before may be trusted.
                            Ok(None) => c.clear(),
                            Err(e) => {
                                tracing::warn!(error = %e, "row cache: lost its change notices; serving without it until it subscribes again");
                                c.set_live(false);
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "row cache: cannot subscribe to change notices yet");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            if cache.strong_count() == 0 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: Uuid, state: &str, status: &str) -> CredentialRow {
        let now = OffsetDateTime::now_utc();
        CredentialRow {
            leaf_user_id: user,
            provider: "climate-field-view".into(),
            leaf_credential_id: None,
            sync_state: state.into(),
            status: Some(status.into()),
            checked_at: None,
            changed_at: None,
            created_time: None,
            public_fields: sqlx::types::Json(serde_json::Map::new()),
            key_id: None,
            wrapped_key: None,
            secrets: None,
            rejection_status: None,
            rejection_detail: None,
            created_at: now,
            updated_at: now,
        }
    }

    const P: &str = "climate-field-view";

    fn live(ttl: Duration) -> RowCache {
        let c = RowCache::new(ttl);
        c.set_live(true);
        c
    }

    #[test]
    fn nothing_is_served_or_filled_before_the_listener_subscribes() {
        let c = RowCache::new(Duration::from_secs(60));
        let u = Uuid::new_v4();
        assert!(c.ticket().is_none());
        c.fill(Some(Ticket(0)), P, &row(u, "SYNCED", "OK"), None);
        assert!(c.get(u, P).is_none());
        c.set_live(true);
        c.fill(c.ticket(), P, &row(u, "SYNCED", "OK"), None);
        assert_eq!(c.get(u, P).unwrap().row.status.as_deref(), Some("OK"));
        // Losing the subscription drops everything and serves nothing.
        c.set_live(false);
        assert!(c.get(u, P).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn only_synced_rows_of_the_named_provider_are_held() {
        let c = live(Duration::from_secs(60));
        let u = Uuid::new_v4();
        for state in ["PENDING_UPSTREAM", "DELETE_PENDING", "REJECTED"] {
            c.fill(c.ticket(), P, &row(u, state, "OK"), None);
            assert!(c.get(u, P).is_none(), "{state} held");
        }
        c.fill(c.ticket(), "john-deere", &row(u, "SYNCED", "OK"), None);
        assert!(c.get(u, P).is_none() && c.get(u, "john-deere").is_none());
    }

    #[test]
    fn an_invalidation_between_the_read_and_the_fill_voids_the_fill() {
        let c = live(Duration::from_secs(60));
        let (u, other) = (Uuid::new_v4(), Uuid::new_v4());
        let ticket = c.ticket();
        c.invalidate(other);
        c.fill(ticket, P, &row(u, "SYNCED", "OK"), None);
        assert!(c.get(u, P).is_none());
        c.fill(c.ticket(), P, &row(u, "SYNCED", "OK"), None);
        assert!(c.get(u, P).is_some());
        c.apply(&u.to_string());
        assert!(c.get(u, P).is_none());
        // An unreadable notice clears everything.
        c.fill(c.ticket(), P, &row(u, "SYNCED", "OK"), None);
        c.apply("*");
        assert!(c.is_empty());
    }

    #[test]
    fn entries_expire_after_the_ttl_and_a_confirmation_does_not_renew_them() {
        let c = live(Duration::from_millis(50));
        let u = Uuid::new_v4();
        c.fill(c.ticket(), P, &row(u, "SYNCED", "OK"), None);
        let at = OffsetDateTime::now_utc();
        c.confirmed_at(u, P, at);
        assert_eq!(c.get(u, P).unwrap().row.checked_at, Some(at));
        std::thread::sleep(Duration::from_millis(60));
        c.confirmed_at(u, P, OffsetDateTime::now_utc());
        assert!(c.get(u, P).is_none());
    }

    #[test]
    fn a_zero_ttl_cache_holds_nothing() {
        let c = live(Duration::ZERO);
        let u = Uuid::new_v4();
        assert!(c.ticket().is_none());
        c.fill(
            Some(Ticket(c.generation.load(Ordering::SeqCst))),
            P,
            &row(u, "SYNCED", "OK"),
            None,
        );
        assert!(c.get(u, P).is_none());
    }

    #[test]
    fn it_holds_at_most_max_entries() {
        let c = live(Duration::from_secs(60));
        for _ in 0..(MAX_ENTRIES + 1000) {
            c.fill(c.ticket(), P, &row(Uuid::new_v4(), "SYNCED", "OK"), None);
        }
        assert!(c.len() <= MAX_ENTRIES, "{}", c.len());
        assert!(c.len() > MAX_ENTRIES / 2);
    }
    fn secrets(fields: &[(&str, &str)]) -> SecretFields {
        let mut s = SecretFields::default();
        for (k, v) in fields {
            s.insert(k, secrecy::SecretString::from(*v));
        }
        s
    }

    #[test]
    fn marks_tell_an_echo_of_the_held_secrets_and_show_them_redacted_but_never_hold_them() {
        let c = live(Duration::from_secs(60));
        let u = Uuid::new_v4();
        let held = secrets(&[
            ("clientSecret", "client-secret-0123456789"),
            ("apiKey", "short"),
        ]);
        c.fill(c.ticket(), P, &row(u, "SYNCED", "OK"), Some(&held));
        let cached = c.get(u, P).unwrap();
        // As gateway::echo_matches: every echoed field must be held, with the same value.
        assert!(c.echo_matches(&cached, &SecretFields::default()));
        assert!(c.echo_matches(&cached, &held));
        assert!(c.echo_matches(&cached, &secrets(&[("apiKey", "short")])));
        assert!(!c.echo_matches(&cached, &secrets(&[("apiKey", "shorT")])));
        assert!(!c.echo_matches(&cached, &secrets(&[("apiKey", "")])));
        assert!(!c.echo_matches(&cached, &secrets(&[("refreshToken", "short")])));
        assert!(!c.echo_matches(
            &cached,
            &secrets(&[
                ("clientSecret", "short"),
                ("apiKey", "client-secret-0123456789")
            ])
        ));
        let marks = cached.secrets.as_ref().unwrap();
        assert_eq!(marks.redacted("clientSecret"), Some("****6789"));
        assert_eq!(marks.redacted("apiKey"), Some("****"));
        assert_eq!(marks.redacted("refreshToken"), None);
        // Another cache (another process) draws another key: the digests are its own.
        let other = live(Duration::from_secs(60));
        other.fill(other.ticket(), P, &row(u, "SYNCED", "OK"), Some(&held));
        let theirs = other.get(u, P).unwrap();
        assert_ne!(
            marks.0[0].digest,
            theirs.secrets.as_ref().unwrap().0[0].digest
        );
        // No value is held, in any form but the redacted one.
        for m in &marks.0 {
            for v in held.0.values() {
                let v = v.expose_secret().as_bytes();
                assert!(!m.digest.windows(v.len()).any(|w| w == v));
                assert!(!m.redacted.contains(std::str::from_utf8(v).unwrap()));
            }
        }
        // A row without secrets matches an empty echo only.
        let bare = Uuid::new_v4();
        c.fill(c.ticket(), P, &row(bare, "SYNCED", "OK"), None);
        let cached = c.get(bare, P).unwrap();
        assert!(c.echo_matches(&cached, &SecretFields::default()));
        assert!(!c.echo_matches(&cached, &secrets(&[("apiKey", "short")])));
        // A confirmation keeps the marks.
        c.confirmed_at(u, P, OffsetDateTime::now_utc());
        assert!(c.echo_matches(&c.get(u, P).unwrap(), &held));
    }
}
