"""Hostile input (issue 6), one module per thing attacked: fuzzing and attack scenarios against the
Send SMS hook and the SQL code API.

Two halves:

* property-based fuzzing with Hypothesis: the hook's body, headers and signatures (the real app,
  driven in process with its lifespan run, against the real database and a fake Aliyun that counts
  every request), and the SQL functions' arguments through the PostgREST emulation;
* attack scenarios: SMS pumping, premium-rate pumping through the hook, enumeration, brute force,
  replays, retired secrets, oversized and slow-loris bodies, and timing of the code comparison.

Every property is stated from the outside: what status and body an attacker gets, and what reaches the
SMS provider or the outbox.
"""
