-- Counts behind /v1/credentials/summary, so the summary reads a handful of rows instead of the
-- whole credential table. A trigger appends +1/-1 deltas (insert-only: no row is ever updated,
-- so concurrent writes never queue on a counter row or deadlock); the sync worker folds the
-- deltas together every few seconds (credential_count_compact).
create table credential_count_delta (
    id          bigserial primary key,
    -- '' stands for "no status yet" (SPEC's UNKNOWN).
    status      text      not null,
    sync_state  text      not null,
    n           bigint    not null
);

create function credential_count_apply() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE'
       and new.status is not distinct from old.status
       and new.sync_state = old.sync_state then
        return null;
    end if;
    if tg_op in ('UPDATE', 'DELETE') and old.sync_state <> 'DELETE_PENDING' then
        insert into credential_count_delta (status, sync_state, n)
        values (coalesce(old.status, ''), old.sync_state, -1);
    end if;
    if tg_op in ('INSERT', 'UPDATE') and new.sync_state <> 'DELETE_PENDING' then
        insert into credential_count_delta (status, sync_state, n)
        values (coalesce(new.status, ''), new.sync_state, 1);
    end if;
    return null;
end;
$$;

create trigger credential_count after insert or update of status, sync_state or delete on credential
    for each row execute function credential_count_apply();

-- Fold every delta into one row per (status, sync_state), atomically.
create function credential_count_compact() returns void language sql as $$
    with folded as (delete from credential_count_delta returning status, sync_state, n)
    insert into credential_count_delta (status, sync_state, n)
    select status, sync_state, sum(n) from folded group by status, sync_state having sum(n) <> 0;
$$;

insert into credential_count_delta (status, sync_state, n)
select coalesce(status, ''), sync_state, count(*) from credential
where sync_state <> 'DELETE_PENDING' group by 1, 2;

-- oldestCheckAt = min(checked_at) from an index, not a scan.
create index credential_checked_at_idx on credential (checked_at) where sync_state <> 'DELETE_PENDING';
