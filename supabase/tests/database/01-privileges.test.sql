-- Privileges of the supabase-aliyun-sms API. Run with `supabase test db` (or pytest).
begin;
select plan(14);

-- Limits are not what this file tests; the transaction is rolled back anyway.
update sms.settings set resend_cooldown_seconds = null, daily_limit_per_phone = null, hourly_limit_per_user = null;

select has_schema('sms');
select ok(not has_schema_privilege('anon', 'sms', 'usage'), 'anon has no usage on schema sms');
select function_privs_are('public', 'request_phone_code', array['text', 'text'], 'anon', array[]::text[]);
select function_privs_are('public', 'verify_phone_code', array['text', 'text', 'text'], 'anon', array[]::text[]);
select function_privs_are('public', 'phone_code_status', array['uuid'], 'anon', array[]::text[]);
select function_privs_are('public', 'request_phone_code', array['text', 'text'], 'authenticated', array['EXECUTE']);
select function_privs_are('public', 'verify_phone_code', array['text', 'text', 'text'], 'service_role', array['EXECUTE']);
select table_privs_are('sms', 'codes', 'authenticated', array[]::text[]);
select table_privs_are('sms', 'outbox', 'service_role', array[]::text[]);
select table_privs_are('sms', 'secrets', 'sms_sidecar', array[]::text[]);

select is(
    (select count(*)::int from pg_class where relnamespace = 'sms'::regnamespace and relkind = 'r' and not relrowsecurity),
    0, 'RLS is enabled on every sms table'
);
select is(
    (select count(*)::int from pg_proc where pronamespace = 'public'::regnamespace and prosecdef
       and proname in ('request_phone_code', 'verify_phone_code', 'phone_code_status')),
    0, 'the public wrappers are security invoker'
);

set local role anon;
select throws_ok($$ select public.request_phone_code('+8613012341234') $$, '42501', null, 'anon is refused');
reset role;

set local role authenticated;
select set_config('request.jwt.claims', '{"role": "authenticated", "sub": "8f0c6f5e-1d7e-4b1f-9a57-3c1c8c0f2a11"}', true);
select lives_ok($$ select public.request_phone_code('+8613012341234', 'pgtap') $$, 'a signed-in user may request a code');

select * from finish();
rollback;
