-- credsync schema, version 1.
-- Plain tables built for bulk queries; secrets only ever appear as AES-256-GCM ciphertext.

-- updated_at moves when the credential itself changes, not when the worker leases or checks it.
create function credential_set_updated_at() returns trigger language plpgsql as $$
begin
    if (new.sync_state, new.status, new.leaf_credential_id, new.created_time, new.public_fields, new.key_id,
        new.wrapped_key, new.secrets, new.rejection_status, new.rejection_detail)
       is distinct from
       (old.sync_state, old.status, old.leaf_credential_id, old.created_time, old.public_fields, old.key_id,
        old.wrapped_key, old.secrets, old.rejection_status, old.rejection_detail) then
        new.updated_at = now();
    end if;
    return new;
end;
$$;

-- One row per (Leaf user, provider): the local copy of a credential and its cached status.
create table credential (
    leaf_user_id        uuid        not null,
    provider            text        not null,
    -- Leaf's own id for the credential (the `id` of its answers); alerts only carry this one.
    leaf_credential_id  uuid,
    -- credsync's view of the upstream state: SYNCED, PENDING_UPSTREAM, DELETE_PENDING or REJECTED.
    sync_state          text        not null check (sync_state in ('SYNCED', 'PENDING_UPSTREAM', 'DELETE_PENDING', 'REJECTED')),
    -- Leaf's credential status (OK, UNAUTHENTICATED, ...); null until Leaf reports one.
    status              text,
    -- when the status was last read from Leaf (or an alert), and when it last changed.
    checked_at          timestamptz,
    changed_at          timestamptz,
    -- Leaf's createdTime, and the non-secret fields Leaf answered with (clientId, scopes, tokenMetadata...).
    created_time        timestamptz,
    public_fields       jsonb       not null default '{}',
    -- Envelope: the secret fields as one AES-256-GCM ciphertext under a per-credential data key,
    -- the data key wrapped by the key-encryption key `key_id`. All three null once shredded.
    key_id              text,
    wrapped_key         bytea,
    secrets             bytea,
    -- Why Leaf refused the create, when sync_state = REJECTED.
    rejection_status    integer,
    rejection_detail    text,
    -- Sync worker bookkeeping: when the credential is next due, and who holds it until when.
    next_sync_at        timestamptz not null default now(),
    lease_owner         text,
    lease_until         timestamptz,
    sync_failures       integer     not null default 0,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    primary key (leaf_user_id, provider),
    check ((key_id is null) = (wrapped_key is null) and (wrapped_key is null) = (secrets is null))
);
create trigger credential_updated_at before update on credential
    for each row execute function credential_set_updated_at();
create unique index credential_leaf_credential_id on credential (leaf_credential_id) where leaf_credential_id is not null;
-- /v1/credentials keyset order and filters.
create index credential_status_idx on credential (status, leaf_user_id, provider);
create index credential_sync_state_idx on credential (sync_state, leaf_user_id, provider);
create index credential_changed_at_idx on credential (changed_at, leaf_user_id, provider);
-- the sync worker's queue: due credentials first.
create index credential_due_idx on credential (next_sync_at) where sync_state in ('SYNCED', 'PENDING_UPSTREAM');
create index credential_key_id_idx on credential (key_id);

-- Creates and deletes that Leaf has not taken yet. Written in the same transaction as the local change.
create table outbox (
    id              bigserial   primary key,
    leaf_user_id    uuid        not null,
    provider        text        not null,
    op              text        not null check (op in ('create', 'delete')),
    attempts        integer     not null default 0,
    -- not before this time (request path owns a fresh entry for a while; then backoff / Retry-After).
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    lease_owner     text,
    lease_until     timestamptz,
    request_id      text,
    actor           text        not null,
    created_at      timestamptz not null default now()
);
create index outbox_due_idx on outbox (next_attempt_at);
create index outbox_user_idx on outbox (leaf_user_id, provider);

-- Status transitions, newest first per user.
create table status_history (
    id            bigserial   primary key,
    leaf_user_id  uuid        not null,
    provider      text        not null,
    from_status   text,
    to_status     text        not null,
    at            timestamptz not null default now(),
    source        text        not null check (source in ('sync', 'request', 'alert'))
);
create index status_history_user_idx on status_history (leaf_user_id, provider, at desc, id desc);

-- Leaf's credential events (its log of calls to the provider), kept for CREDSYNC_EVENTS_RETENTION_DAYS.
create table event (
    leaf_user_id  uuid        not null,
    provider      text        not null,
    id            text        not null,
    created_date  timestamptz not null,
    status_code   integer     not null,
    headers       text        not null default '',
    body          text        not null default '',
    primary key (leaf_user_id, provider, id)
);
create index event_user_created_idx on event (leaf_user_id, provider, created_date desc, id desc);
create index event_created_idx on event (created_date desc, id desc);
create index event_status_code_idx on event (status_code, created_date desc, id desc);

-- Who did what. Never holds a secret.
create table audit (
    id            bigserial   primary key,
    at            timestamptz not null default now(),
    actor         text        not null,
    action        text        not null,
    leaf_user_id  uuid,
    provider      text,
    outcome       text        not null check (outcome in ('success', 'failure', 'denied')),
    request_id    text,
    detail        text
);
create index audit_at_idx on audit (at desc, id desc);
create index audit_user_idx on audit (leaf_user_id, at desc, id desc);
create index audit_actor_idx on audit (actor, at desc, id desc);
create index audit_action_idx on audit (action, at desc, id desc);

-- Idempotency-Key records, scoped to (caller sub, path), kept 24 hours.
create table idempotency (
    subject       text        not null,
    path          text        not null,
    key           text        not null,
    -- keyed hash (HMAC under key `hash_key_id`) of the canonical request body: never the body itself.
    request_hash  bytea       not null,
    hash_key_id   text        not null,
    -- null while the first request is still running.
    status        integer,
    content_type  text,
    body          bytea,
    headers       jsonb,
    created_at    timestamptz not null default now(),
    expires_at    timestamptz not null,
    primary key (subject, path, key)
);
create index idempotency_expires_idx on idempotency (expires_at);

-- Key-encryption keys seen by this database: a fingerprint (never the key) and a use counter.
create table encryption_key (
    key_id        text        primary key,
    fingerprint   bytea       not null,
    encryptions   bigint      not null default 0,
    created_at    timestamptz not null default now()
);

-- On-demand sync runs (POST /v1/sync, `credsync sync --once`).
create table sync_run (
    id            uuid        primary key,
    state         text        not null check (state in ('RUNNING', 'DONE', 'FAILED')),
    users_total   integer     not null,
    users_done    integer     not null default 0,
    users_failed  integer     not null default 0,
    requested_by  text        not null,
    started_at    timestamptz not null default now(),
    -- progress heartbeat: a RUNNING run whose owner stopped beating is reported FAILED.
    heartbeat_at  timestamptz not null default now(),
    finished_at   timestamptz
);
