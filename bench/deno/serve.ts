// bench/hook.py's adapter for index.ts (unchanged, see README.md here): it fixes Aliyun's address
// (https://dysmsapi.aliyuncs.com/) and leaves Deno.serve's port to the runtime (8000, all interfaces).
// This wraps both from outside, then loads index.ts: its SendSms fetch goes to $BENCH_ALIYUN_URL,
// and it listens on 127.0.0.1:$PORT. Nothing else is touched; nothing is downloaded.
const aliyun = Deno.env.get("BENCH_ALIYUN_URL");
const port = Number(Deno.env.get("PORT"));
if (!aliyun || !port) throw new Error("BENCH_ALIYUN_URL and PORT must be set");

const realFetch = globalThis.fetch;
globalThis.fetch = (input, init) =>
  realFetch(input === "https://dysmsapi.aliyuncs.com/" ? aliyun : input, init);

const realServe = Deno.serve;
// deno-lint-ignore no-explicit-any
(Deno as any).serve = (handler: Deno.ServeHandler) =>
  realServe({ hostname: "127.0.0.1", port, onListen: () => {} }, handler);

await import("./index.ts");
