-- The verification-code rules. Run with `supabase test db` (or pytest).
begin;
select plan(12);

update sms.settings set resend_cooldown_seconds = null, daily_limit_per_phone = null, hourly_limit_per_user = null;

set local role authenticated;
select set_config('request.jwt.claims', '{"role": "authenticated", "sub": "2b1de4a4-54cc-4e37-a2c1-0cd4d1c9c5a2"}', true);

select ok(
    public.request_phone_code('13912340001', 'pgtap') ?& array['request_id', 'expires_in', 'retry_after'],
    'request_phone_code returns request_id, expires_in and retry_after'
);
reset role;

-- The plain code exists only in the outbox, while it waits for delivery.
create temporary table issued on commit drop as
    select o.code, o.code_id from sms.outbox as o where o.phone = '8613912340001' and o.purpose = 'pgtap';
grant select on issued to authenticated;
select matches((select code from issued), '^[0-9]{6}$', 'the code is six digits');
select is(
    (select count(*)::int from sms.codes where id = (select code_id from issued) and code_hash is not null
       and position(convert_to((select code from issued), 'UTF8') in code_hash) = 0),
    1, 'only a hash of the code is stored'
);

set local role authenticated;
select is(
    public.verify_phone_code('+8613912340001', lpad((((select code from issued)::int + 1) % 1000000)::text, 6, '0'), 'pgtap'),
    '{"valid": false, "reason": "mismatch", "attempts_left": 2}'::jsonb,
    'a wrong code is a mismatch with attempts left'
);
select is(
    public.verify_phone_code('+8613912340001', (select code from issued), 'pgtap'),
    '{"valid": true}'::jsonb,
    'the right code verifies'
);
select is(
    public.verify_phone_code('+8613912340001', (select code from issued), 'pgtap') ->> 'reason',
    'not_found',
    'a code verifies only once'
);

-- Three failures invalidate the phone's codes.
select public.request_phone_code('+8613912340002', 'pgtap');
select is(public.verify_phone_code('8613912340002', 'x', 'pgtap') ->> 'attempts_left', '2', 'first failure');
select is(public.verify_phone_code('8613912340002', 'y', 'pgtap') ->> 'attempts_left', '1', 'second failure');
select is(public.verify_phone_code('8613912340002', 'z', 'pgtap') ->> 'reason', 'too_many_attempts', 'third failure');

-- Another user cannot use someone else's code.
select set_config('request.jwt.claims', '{"role": "authenticated", "sub": "0e9f3a1c-7d61-4d35-b5f3-6a0d1e2c3b4a"}', true);
select is(public.verify_phone_code('8613912340001', '000000', 'pgtap') ->> 'reason', 'not_found',
          'codes of other users are invisible');

select throws_ok($$ select public.request_phone_code('+1 301 234 1234', 'pgtap') $$, 'PGRST', null,
                 'numbers outside the allow-list are refused');
select throws_ok($$ select public.request_phone_code('not a number', 'pgtap') $$, 'PGRST', null,
                 'malformed numbers are refused');

select * from finish();
rollback;
