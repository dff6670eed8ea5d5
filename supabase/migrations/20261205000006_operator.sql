-- supabase-aliyun-sms 6/6: what operators run and look at.
--
-- sms.delivery_log: one row per SMS requested with its latest send attempt, for watching deliveries
-- in the Studio SQL editor (`select * from sms.delivery_log order by created_at desc limit 50;`). It shows no code and no full
-- phone number, and only `postgres` (its owner) may read it.
-- sms.test_number_count(): how many numbers sms.settings.test_codes lists, so that `sms-sidecar check`
-- (connected as sms_sidecar, which may not read sms.settings) can warn that the Auth hook cannot use
-- them.
-- sms.purge(): retention, the operator's (pg_cron as postgres).
-- sms.schema_version(): the newest migration's version, which /readyz compares with the sidecar's.

------------------------------------------------------------------------------------------------
-- Delivery log
------------------------------------------------------------------------------------------------

-- Dropped first: a later migration adds columns, and this file must still run after it (a user
-- pasting it into the SQL editor again).
drop view if exists sms.delivery_log;
create view sms.delivery_log
with (security_invoker = true)
as
select
    o.created_at,
    o.source,
    o.purpose,
    -- As the sidecar's logs mask it: country code and last four digits, e.g. +86*******1234.
    case
        when pg_catalog.length(p.digits) < 8 then pg_catalog.repeat('*', pg_catalog.length(p.digits))
        else '+' || pg_catalog.left(p.digits, p.cc_len)
            || pg_catalog.repeat('*', pg_catalog.length(p.digits) - p.cc_len - 4)
            || pg_catalog.right(p.digits, 4)
    end as phone_masked,
    o.user_id,
    o.status,
    o.attempts,
    o.provider_code,
    o.last_error,
    o.biz_id,
    o.sent_at,
    d.id as out_id,
    d.outcome as last_outcome,
    d.provider_code as last_provider_code,
    d.latency_ms as last_latency_ms,
    d.finished_at as last_finished_at,
    o.id as message_id
from sms.outbox as o
cross join lateral (
    select
        x.digits,
        case
            when pg_catalog.left(x.digits, 1) in ('1', '7') then 1
            when pg_catalog.left(x.digits, 2) in (
                '20', '27', '30', '31', '32', '33', '34', '36', '39', '40', '41', '43', '44', '45', '46', '47',
                '48', '49', '51', '52', '53', '54', '55', '56', '57', '58', '60', '61', '62', '63', '64', '65',
                '66', '81', '82', '84', '86', '90', '91', '92', '93', '94', '95', '98'
            ) then 2
            else 3
        end as cc_len
    from (select pg_catalog.regexp_replace(o.phone, '[^0-9]', '', 'g') as digits) as x
) as p
left join lateral (
    select dd.id, dd.outcome, dd.provider_code, dd.latency_ms, dd.finished_at
    from sms.deliveries as dd
    where dd.message_id = o.id
    order by dd.attempt desc, dd.id desc
    limit 1
) as d on true;

comment on view sms.delivery_log is 'supabase-aliyun-sms: one row per SMS requested, with its latest send attempt; phone numbers masked, codes never shown. out_id is the OutId sent to Aliyun (QuerySendDetails results and receipts carry it). For operators (postgres) only: select * from sms.delivery_log order by created_at desc limit 50;';

revoke all on sms.delivery_log from public, anon, authenticated, service_role, sms_sidecar, sms_grpc,
    supabase_auth_admin;

------------------------------------------------------------------------------------------------
-- Test numbers, for `sms-sidecar check`
------------------------------------------------------------------------------------------------

create or replace function sms.test_number_count()
returns integer
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(sum((select count(*) from pg_catalog.jsonb_object_keys(s.test_codes))), 0)::integer
    from sms.settings as s
$$;
comment on function sms.test_number_count() is 'supabase-aliyun-sms: how many numbers sms.settings.test_codes lists (never their codes), for sms-sidecar check: the Auth hook cannot use them, since GoTrue generates the OTP (use GOTRUE_SMS_TEST_OTP for Auth).';

grant execute on function sms.test_number_count() to sms_sidecar;

------------------------------------------------------------------------------------------------
-- Retention
------------------------------------------------------------------------------------------------

create or replace function sms.purge(p_keep interval default '30 days')
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    -- The outbox is also the record the 24-hour limits count.
    keep interval := greatest(p_keep, interval '1 day');
    codes_deleted integer;
    messages_deleted integer;
begin
    delete from sms.outbox as o
    where o.status in ('sent', 'failed') and o.created_at < now() - keep;
    get diagnostics messages_deleted = row_count;

    delete from sms.codes as c where c.expires_at < now() - keep;
    get diagnostics codes_deleted = row_count;

    -- A key row only serialises requests; one untouched for a day guards nothing the limits count.
    delete from sms.limit_locks as l where l.touched_at < now() - interval '1 day';

    return jsonb_build_object('codes', codes_deleted, 'messages', messages_deleted);
end
$$;
comment on function sms.purge(interval) is 'supabase-aliyun-sms retention: deletes codes expired, and delivered or failed messages (with their ledger rows) created, longer ago than p_keep (at least 1 day). Schedule with pg_cron: select cron.schedule(''sms-purge'', ''17 3 * * *'', ''select sms.purge()'');';

------------------------------------------------------------------------------------------------
-- Version: every later migration redefines this with its own version
------------------------------------------------------------------------------------------------

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261205000006'::text $$;
comment on function sms.schema_version() is 'supabase-aliyun-sms: version of the newest migration applied; /readyz compares it with the sidecar''s own.';
grant execute on function sms.schema_version() to sms_sidecar, sms_grpc;

-- New functions are PUBLIC's to execute until this (see 20261205000001_schema.sql); the grants stand
-- beside the functions.
revoke execute on all functions in schema sms from public;

notify pgrst, 'reload schema';
