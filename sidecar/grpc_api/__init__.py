"""The gRPC drop-in for the phone-number service (`phonenumberservice.PhoneNumberService`).

`server.py` is the servicer; `phonenumberservice_pb2*.py` are stubs generated from
`phonenumberservice.proto` and checked in: regenerate them with `scripts/gen_grpc.sh`. Nothing here
is imported unless gRPC is used, so the base install needs no grpcio (`pip install
'supabase-aliyun-sms[grpc]'` adds it).
"""
