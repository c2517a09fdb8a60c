-- Invalidation for the serving processes' row caches (src/rowcache.rs): every change to a
-- SYNCED credential's own fields, and every removal of one, is announced on the channel
-- `credsync_credential` with the Leaf user id as payload, by whichever process (or psql) made it.
-- A cache only ever holds SYNCED rows, so changes that start from another state are not
-- announced (a create and its settle cost nothing here), nor are the worker's bookkeeping
-- columns or `checked_at` (the same column list as credential_set_updated_at).
create function credential_notify() returns trigger language plpgsql as $$
begin
    if tg_op = 'TRUNCATE' then
        perform pg_notify('credsync_credential', '*');
    else
        perform pg_notify('credsync_credential', old.leaf_user_id::text);
    end if;
    return null;
end;
$$;

create trigger credential_notify_update after update on credential
    for each row
    when (old.sync_state = 'SYNCED'
          and (new.leaf_user_id, new.provider, new.sync_state, new.status, new.leaf_credential_id,
               new.created_time, new.public_fields, new.key_id, new.wrapped_key, new.secrets,
               new.rejection_status, new.rejection_detail)
              is distinct from
              (old.leaf_user_id, old.provider, old.sync_state, old.status, old.leaf_credential_id,
               old.created_time, old.public_fields, old.key_id, old.wrapped_key, old.secrets,
               old.rejection_status, old.rejection_detail))
    execute function credential_notify();

create trigger credential_notify_delete after delete on credential
    for each row when (old.sync_state = 'SYNCED')
    execute function credential_notify();

create trigger credential_notify_truncate after truncate on credential
    for each statement execute function credential_notify();
