-- supabase-aliyun-sms: delivery results recorded several to a statement.
--
-- Under load many hook requests and worker sends finish at once; recording each result is then a
-- statement and a commit of its own. The sidecar hands over the results that are waiting while one
-- such statement runs as the next one, and every request still waits for its own commit.

create or replace function sms.finish_deliveries(p_results jsonb)
returns jsonb
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    r jsonb;
    statuses jsonb := '[]';
begin
    if jsonb_typeof(p_results) is distinct from 'array' then
        raise exception 'sms.finish_deliveries takes a JSON array of results' using errcode = '22023';
    end if;
    for r in select value from jsonb_array_elements(p_results) loop
        statuses := statuses || to_jsonb(sms.finish_delivery(
            (r ->> 'delivery_id')::bigint,
            r ->> 'outcome',
            r ->> 'provider',
            r ->> 'provider_code',
            r ->> 'provider_message',
            r ->> 'biz_id',
            r ->> 'provider_request_id',
            (r ->> 'latency_ms')::integer,
            coalesce((r ->> 'retry_in_seconds')::integer, 30),
            coalesce((r ->> 'max_attempts')::integer, 5)
        ));
    end loop;
    return statuses;
end
$$;
comment on function sms.finish_deliveries(jsonb) is 'supabase-aliyun-sms: sms.finish_delivery for each element of a JSON array ({delivery_id, outcome, provider, provider_code, provider_message, biz_id, provider_request_id, latency_ms, retry_in_seconds, max_attempts}), in order, in one statement; returns the array of new message statuses. All or nothing: one bad element fails them all.';

revoke all on function sms.finish_deliveries(jsonb) from public, anon, authenticated, service_role;
grant execute on function sms.finish_deliveries(jsonb) to sms_sidecar;

create or replace function sms.schema_version()
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$ select '20261204000002'::text $$;
