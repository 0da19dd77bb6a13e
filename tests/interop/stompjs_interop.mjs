// @stomp/stompjs (the browser STOMP client) against the SecureCollab broker over /ws.
//
// usage: node stompjs_interop.mjs <ws-url> <token-a> <token-b> <token-c>
// Runs every scenario in order; prints one JSON line per passed step and exits 0, or
// prints the failure and exits 1. Every wait is bounded (STEP_MS).

import { Client } from "@stomp/stompjs";
import WebSocket from "ws";

const [url, tokenA, tokenB, tokenC] = process.argv.slice(2);
const STEP_MS = 10000;
const HEARTBEAT_MS = 200;

function fail(msg) {
  console.log(JSON.stringify({ ok: false, error: msg }));
  process.exit(1);
}

function within(promise, what, ms = STEP_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function step(name, extra = {}) {
  console.log(JSON.stringify({ ok: true, step: name, ...extra }));
}

// A connected client plus a queue of received messages per subscription.
async function connect(token, label) {
  const stats = { pongs: 0, closes: 0, errors: [] };
  const client = new Client({
    webSocketFactory: () => new WebSocket(url, ["v12.stomp", "v11.stomp", "v10.stomp"]),
    connectHeaders: { passcode: token, host: "securecollab" },
    heartbeatIncoming: HEARTBEAT_MS,
    heartbeatOutgoing: HEARTBEAT_MS,
    reconnectDelay: 0, // a drop must fail the test, not be papered over
    debug: (line) => {
      if (line.includes("<<< PONG")) stats.pongs += 1;
    },
  });
  client.onStompError = (frame) => stats.errors.push(frame.headers.message);
  client.onWebSocketClose = () => {
    stats.closes += 1;
  };
  const connected = new Promise((resolve, reject) => {
    client.onConnect = (frame) => resolve(frame);
    client.onWebSocketError = (e) => reject(new Error(`${label}: websocket error ${e.message || e}`));
  });
  client.activate();
  const frame = await within(connected, `${label} CONNECTED`);
  return { client, frame, stats };
}

function inbox(client, destination, headers = {}) {
  const items = [];
  let wake = null;
  const sub = client.subscribe(
    destination,
    (msg) => {
      items.push(msg);
      if (wake) wake();
    },
    headers,
  );
  return {
    sub,
    items,
    async next(what) {
      while (items.length === 0) {
        await within(new Promise((r) => (wake = r)), what);
      }
      return items.shift();
    },
  };
}

async function receipted(client, send) {
  const id = `r-${Math.random().toString(36).slice(2)}`;
  const got = new Promise((resolve) => client.watchForReceipt(id, resolve));
  send(id);
  return within(got, `receipt ${id}`);
}

async function main() {
  const a = await connect(tokenA, "a");
  const b = await connect(tokenB, "b");
  const c = await connect(tokenC, "c");
  if (a.frame.headers.version !== "1.2") fail(`version ${a.frame.headers.version}`);
  if (!a.frame.headers["user-name"]) fail("no user-name in CONNECTED");
  step("connect", { version: a.frame.headers.version, heartBeat: a.frame.headers["heart-beat"] });

  // subscribe (with receipt) / send (with receipt) / receive on a queue, client-individual ack
  const q = inbox(b.client, "/queue/interop", { ack: "client-individual", receipt: "sub-q" });
  await within(new Promise((r) => b.client.watchForReceipt("sub-q", r)), "subscribe receipt");
  await receipted(a.client, (rid) =>
    a.client.publish({
      destination: "/queue/interop",
      body: JSON.stringify({ hello: "world" }),
      headers: { "content-type": "application/json", receipt: rid },
    }),
  );
  const m = await q.next("queue message");
  if (m.body !== '{"hello":"world"}') fail(`body ${m.body}`);
  for (const h of ["subscription", "message-id", "destination", "ack", "content-length"]) {
    if (!m.headers[h]) fail(`MESSAGE without ${h}`);
  }
  if (m.headers["content-type"] !== "application/json") fail("content-type lost");
  await receipted(b.client, (rid) => m.ack({ receipt: rid }));
  step("send-receive-ack");

  // topic fan-out, text and binary bodies
  const t1 = inbox(b.client, "/topic/interop");
  const t2 = inbox(c.client, "/topic/interop");
  await sleep(100);
  const binary = new Uint8Array([0xff, 0x00, 0xfe, 0x41]);
  await receipted(a.client, (rid) =>
    a.client.publish({ destination: "/topic/interop", binaryBody: binary, headers: { receipt: rid } }),
  );
  for (const t of [t1, t2]) {
    const got = await t.next("topic message");
    if (Buffer.compare(Buffer.from(got.binaryBody), Buffer.from(binary)) !== 0) fail("binary body changed");
  }
  t1.sub.unsubscribe();
  t2.sub.unsubscribe();
  step("topic-binary");

  // NACK -> redelivered to the other consumer with redelivered:true
  const nb = inbox(b.client, "/queue/interop-nack", { ack: "client-individual" });
  const nc = inbox(c.client, "/queue/interop-nack", { ack: "client-individual" });
  await sleep(100);
  await receipted(a.client, (rid) =>
    a.client.publish({ destination: "/queue/interop-nack", body: "job", headers: { receipt: rid } }),
  );
  const first = await within(
    Promise.race([nb.next("nack first b"), nc.next("nack first c")]),
    "first delivery",
  );
  const firstIsB = nb.items.length === 0 && first.headers.subscription === nb.sub.id;
  first.nack();
  const other = firstIsB ? nc : nb;
  const again = await other.next("redelivery");
  if (again.body !== "job") fail(`redelivered body ${again.body}`);
  if (again.headers.redelivered !== "true") fail("no redelivered:true");
  again.ack();
  nb.sub.unsubscribe();
  nc.sub.unsubscribe();
  step("nack-redelivery");

  // transactions: nothing before COMMIT, nothing after ABORT
  const tq = inbox(b.client, "/queue/interop-tx");
  await sleep(100);
  const tx = a.client.begin();
  a.client.publish({ destination: "/queue/interop-tx", body: "t1", headers: { transaction: tx.id } });
  a.client.publish({ destination: "/queue/interop-tx", body: "t2", headers: { transaction: tx.id } });
  await sleep(300);
  if (tq.items.length !== 0) fail("transactional SEND visible before COMMIT");
  tx.commit();
  const got1 = await tq.next("tx 1");
  const got2 = await tq.next("tx 2");
  if (got1.body !== "t1" || got2.body !== "t2") fail("transaction order");
  const tx2 = a.client.begin();
  a.client.publish({ destination: "/queue/interop-tx", body: "never", headers: { transaction: tx2.id } });
  tx2.abort();
  await receipted(a.client, (rid) =>
    a.client.publish({ destination: "/queue/interop-tx", body: "after", headers: { receipt: rid } }),
  );
  const after = await tq.next("after abort");
  if (after.body !== "after") fail(`aborted SEND was delivered: ${after.body}`);
  step("transaction");

  // heart-beats both ways: stay connected well past 2x the interval, server beats arrive
  const before = a.stats.pongs;
  await sleep(HEARTBEAT_MS * 6);
  if (a.stats.closes !== 0 || b.stats.closes !== 0) fail("dropped while heart-beating");
  if (a.stats.pongs - before < 2) fail(`only ${a.stats.pongs - before} server heart-beats`);
  step("heart-beats", { serverBeats: a.stats.pongs - before });

  // errors reported as ERROR frames: forbidden destination
  const errored = new Promise((resolve) => {
    c.client.onStompError = (frame) => resolve(frame.headers.message);
  });
  c.client.subscribe("/user/someone-else/queue/private", () => {});
  const msg = await within(errored, "ERROR for another user's queue");
  if (!msg.includes("belongs to another user")) fail(`unexpected ERROR ${msg}`);
  step("error-frame", { message: msg });

  // disconnect (stompjs sends DISCONNECT with a receipt and waits for it)
  await within(a.client.deactivate(), "deactivate a");
  await within(b.client.deactivate(), "deactivate b");
  await within(c.client.deactivate({ force: true }), "deactivate c");
  if (a.stats.errors.length || b.stats.errors.length) fail(`unexpected errors ${a.stats.errors} ${b.stats.errors}`);
  step("disconnect");
  process.exit(0);
}

main().catch((e) => fail(e.stack || String(e)));
