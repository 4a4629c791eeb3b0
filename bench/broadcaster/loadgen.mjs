// Load generator for the broadcaster benchmark (bench/broadcaster/run.py drives it).
//
// N WebSocket clients written directly on node:net: the server and this generator share a
// small machine, so every client does only what a client must (handshake, masked subscribe,
// pong, walking frame headers), and only every `sampleEvery`-th client also reads the
// publisher's send stamp ("sentAt", wall-clock ms, in the envelope args) to measure
// publish-to-receive latency. Every client counts its events and checks their seq order: on
// events:* seqs follow each other; on a market channel they step by the number of markets,
// as the publisher gives event seq s to market s % markets. Deliveries are also counted per
// seq, so that what arrived can be held against what was published (`tally`).
// (A first version on npm's `ws` needed 55-65 % of the machine's CPU at 100k messages/s and
// was the bottleneck of the measurement; this one needs no package at all.)
//
// Config: one JSON argument {url, clients, mode: "events"|"markets", markets, concurrency,
// slow, sampleEvery}; url is ws://host:port/path or ws+unix:///socket:/path. Then it reads
// commands on stdin, one per line, and answers each with one JSON line:
//   start   reset the counters: the measurement window begins
//   mark    note the p99 so far (p99BeforeMarkMs), begin a second histogram (p99AfterMarkMs)
//   report  the counters since start (latency percentiles, deliveries, gaps, duplicates)
//   tally A B  for the events of seqs A+1..B: deliveries the clients should have had (each
//           event's recipients, the clients that stop reading not counted), had, and missed
//   exit    close every client and exit (as it does when stdin closes)
// It prints {"phase":"connected",...} once every client is subscribed or gone: `subscribed`
// says how many were, `allConnectedMs` is null unless all of them were, and `closes` counts
// the clients gone by reason, one each: a close code, "http <status>" (handshake refused), a
// socket error (e.g. ECONNREFUSED), or "dropped" (closed without any of those).

import { createConnection } from "node:net";
import { randomBytes } from "node:crypto";
import { createInterface } from "node:readline";
import { monitorEventLoopDelay, performance, PerformanceObserver } from "node:perf_hooks";

const config = JSON.parse(process.argv[2]);
const sampleEvery = config.sampleEvery || 1;
const now = () => performance.timeOrigin + performance.now();
const BUCKET_US = 10;
const MAX_US = 10_000_000;
const STAMP = Buffer.from('"sentAt":"');
const SEQ = Buffer.from('"seq":');
const EVENT_HEAD = Buffer.from('{"type":"event"');
const HEADER_END = Buffer.from("\r\n\r\n");
// Every socket reads into this one buffer (net's `onread`), so receiving allocates nothing:
// with a Buffer per read, 10,000 clients made V8 run a full collection about every 0.7 s,
// pausing the generator 10-18 ms each time, which showed up as the server's latency tail.
const READ_BUFFER = Buffer.alloc(256 * 1024);

let histogram = new Uint32Array(MAX_US / BUCKET_US + 1);
let afterMark = null; // a second histogram from "mark" on (e.g. once a slow client was cut off)
let sampledAfterMark = 0;
let p99BeforeMark = null;
let received = 0;
let sampled = 0;
let gaps = 0;
let duplicates = 0;
let maxLatencyUs = 0;
let measuring = false;
// Deliveries per seq, duplicates not counted, since the clients connected (not only since
// start: what a tally asks about may have arrived before). Grown as seqs come.
let delivered = new Uint32Array(1 << 16);
// Event seq s goes to market s % markets: how many reading clients follow each market.
const step = config.mode === "markets" ? config.markets : 1;
const readers = new Uint32Array(step);
for (let i = config.slow || 0; i < config.clients; i++) readers[i % step]++;
const closes = {};
const closed = (client, reason) => {
  if (client.closed) return;
  client.closed = true;
  closes[reason] = (closes[reason] || 0) + 1;
};
const clients = [];
// The generator's own stalls, over the measurement window: a latency tail they explain is
// the generator's, not the server's.
const loopDelay = monitorEventLoopDelay({ resolution: 1 });
let gcPauses = [];
new PerformanceObserver((list) => {
  if (measuring) for (const entry of list.getEntries()) gcPauses.push(entry.duration);
}).observe({ entryTypes: ["gc"] });

const target = (() => {
  const unix = config.url.match(/^ws\+unix:\/\/(.*):(\/.*)$/);
  if (unix) return { connect: { path: unix[1] }, host: "localhost", path: unix[2] };
  const url = new URL(config.url);
  return { connect: { host: url.hostname, port: Number(url.port) }, host: url.host, path: url.pathname };
})();

function marketAddress(i) {
  return "0x" + (i + 1).toString(16).padStart(40, "0");
}

function numberAfter(buf, marker, from, to) {
  const at = buf.indexOf(marker, from);
  if (at < 0 || at >= to) return -1;
  let value = 0;
  let scale = 0;
  for (let i = at + marker.length; i < to; i++) {
    const c = buf[i];
    if (c >= 48 && c <= 57) {
      if (scale) {
        value += (c - 48) * scale;
        scale /= 10;
      } else value = value * 10 + (c - 48);
    } else if (c === 46 && !scale) scale = 0.1;
    else break;
  }
  return value;
}

function maskedFrame(opcode, payload) {
  const mask = randomBytes(4);
  const head = payload.length < 126 ? Buffer.from([0x80 | opcode, 0x80 | payload.length]) : Buffer.from([0x80 | opcode, 0x80 | 126, payload.length >> 8, payload.length & 255]);
  const body = Buffer.alloc(payload.length);
  for (let i = 0; i < payload.length; i++) body[i] = payload[i] ^ mask[i & 3];
  return Buffer.concat([head, mask, body]);
}

function onText(client, buf, start, end) {
  if (end - start > EVENT_HEAD.length && buf.compare(EVENT_HEAD, 0, EVENT_HEAD.length, start, start + EVENT_HEAD.length) === 0) {
    const seq = numberAfter(buf, SEQ, start, end);
    if (seq <= client.lastSeq) duplicates++;
    else {
      if (client.lastSeq > 0 && seq !== client.lastSeq + step) gaps++;
      if (!client.slow) countDelivery(seq);
    }
    client.lastSeq = seq;
    if (!measuring) return;
    received++;
    if (!client.sampled) return;
    const sent = numberAfter(buf, STAMP, start, end);
    if (sent < 0) return;
    sampled++;
    let us = Math.round((now() - sent) * 1000);
    if (us < 0) us = 0;
    if (us > maxLatencyUs) maxLatencyUs = us;
    histogram[(Math.min(MAX_US, us) / BUCKET_US) | 0]++;
    if (afterMark) {
      afterMark[(Math.min(MAX_US, us) / BUCKET_US) | 0]++;
      sampledAfterMark++;
    }
    return;
  }
  const message = JSON.parse(buf.subarray(start, end).toString());
  if (message.type === "subscribed" && !client.subscribedMs) {
    client.subscribedMs = now() - client.started;
    if (client.slow) client.socket.pause(); // stop reading: a slow consumer
    client.resolve();
  }
}

function countDelivery(seq) {
  if (seq >= delivered.length) {
    let size = delivered.length;
    while (size <= seq) size *= 2;
    const grown = new Uint32Array(size);
    grown.set(delivered);
    delivered = grown;
  }
  delivered[seq]++;
}

function tally(after, last) {
  let expected = 0;
  let had = 0;
  let missing = 0;
  let eventsShort = 0;
  for (let seq = after + 1; seq <= last; seq++) {
    const wanted = readers[seq % step];
    const got = seq < delivered.length ? delivered[seq] : 0;
    expected += wanted;
    had += got;
    if (got < wanted) {
      missing += wanted - got;
      eventsShort++;
    }
  }
  return { phase: "tally", events: Math.max(0, last - after), expected, delivered: had, missing, eventsShort };
}

function onData(client, chunk) {
  let buf = client.rest ? Buffer.concat([client.rest, chunk]) : chunk;
  client.rest = null;
  let at = 0;
  if (!client.open) {
    const end = buf.indexOf(HEADER_END);
    if (end < 0) {
      client.rest = Buffer.from(buf); // a copy: chunk is the shared read buffer
      return;
    }
    const status = buf.subarray(0, 12).toString().split(" ")[1];
    if (status !== "101") {
      closed(client, `http ${status}`);
      client.socket.destroy();
      return;
    }
    client.open = true;
    client.handshakeMs = now() - client.started;
    client.socket.write(maskedFrame(1, Buffer.from(JSON.stringify({ type: "subscribe", channel: client.channel }))));
    at = end + 4;
  }
  while (buf.length - at >= 2) {
    const opcode = buf[at] & 0x0f;
    let length = buf[at + 1] & 0x7f;
    let header = 2;
    if (length === 126) {
      if (buf.length - at < 4) break;
      length = buf.readUInt16BE(at + 2);
      header = 4;
    } else if (length === 127) {
      if (buf.length - at < 10) break;
      length = Number(buf.readBigUInt64BE(at + 2));
      header = 10;
    }
    if (buf.length - at < header + length) break;
    const start = at + header;
    const end = start + length;
    if (opcode === 1) onText(client, buf, start, end);
    else if (opcode === 9) client.socket.write(maskedFrame(10, buf.subarray(start, end)));
    else if (opcode === 8) {
      closed(client, String(length >= 2 ? buf.readUInt16BE(start) : 1005));
      client.socket.end(maskedFrame(8, buf.subarray(start, start + 2)));
      client.resolve();
      return;
    }
    at = end;
  }
  if (at < buf.length) client.rest = Buffer.from(buf.subarray(at)); // a copy, as above
}

function open(i) {
  return new Promise((resolve) => {
    const client = {
      i,
      lastSeq: 0,
      started: now(),
      slow: i < (config.slow || 0),
      sampled: i % sampleEvery === 0,
      channel: config.mode === "markets" ? "market:" + marketAddress(i % config.markets) : "events:*",
      open: false,
      closed: false,
      rest: null,
      resolve,
    };
    const onread = { buffer: READ_BUFFER, callback: (size, buf) => onData(client, buf.subarray(0, size)) };
    const socket = createConnection({ ...target.connect, onread }, () => {
      socket.setNoDelay(true);
      socket.write(
        `GET ${target.path} HTTP/1.1\r\nHost: ${target.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
          `Sec-WebSocket-Key: ${randomBytes(16).toString("base64")}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    client.socket = socket;
    socket.on("error", (error) => {
      client.error = error.code || "error";
    });
    socket.on("close", () => {
      closed(client, client.error || "dropped");
      resolve();
    });
    clients.push(client);
  });
}

async function connectAll() {
  const started = now();
  const concurrency = config.concurrency || config.clients;
  let next = 0;
  async function worker() {
    while (next < config.clients) await open(next++);
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, config.clients) }, worker));
  const sorted = (key) => clients.map((c) => c[key]).filter((v) => v !== undefined && v !== null).sort((a, b) => a - b);
  const pick = (list, p) => (list.length ? list[Math.min(list.length - 1, Math.ceil(list.length * p) - 1)] : null);
  const handshakes = sorted("handshakeMs");
  const subscribed = sorted("subscribedMs");
  return {
    phase: "connected",
    clients: clients.length,
    subscribed: subscribed.length,
    allConnectedMs: subscribed.length === config.clients ? now() - started : null,
    handshakeP50Ms: pick(handshakes, 0.5),
    handshakeP99Ms: pick(handshakes, 0.99),
    handshakeMaxMs: pick(handshakes, 1),
    subscribedP99Ms: pick(subscribed, 0.99),
    closes,
  };
}

function percentile(p, counts = histogram, total = sampled) {
  if (!total) return null;
  const wanted = Math.ceil(total * p);
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= wanted) return (i * BUCKET_US) / 1000;
  }
  return MAX_US / 1000;
}

function report() {
  return {
    phase: "report",
    received,
    sampled,
    gaps,
    duplicates,
    p50Ms: percentile(0.5),
    p90Ms: percentile(0.9),
    p99Ms: percentile(0.99),
    p999Ms: percentile(0.999),
    maxMs: maxLatencyUs / 1000,
    p99BeforeMarkMs: p99BeforeMark,
    p99AfterMarkMs: afterMark ? percentile(0.99, afterMark, sampledAfterMark) : null,
    sampledAfterMark,
    open: clients.filter((c) => !c.closed).length,
    closes,
    genLoopDelayP99Ms: loopDelay.percentile(99) / 1e6,
    genLoopDelayMaxMs: loopDelay.max / 1e6,
    genGcCount: gcPauses.length,
    genGcTotalMs: gcPauses.reduce((a, b) => a + b, 0),
    genGcMaxMs: gcPauses.reduce((a, b) => Math.max(a, b), 0),
  };
}

function exit() {
  for (const c of clients) c.socket.destroy();
  process.exit(0);
}

// Listening from the start: stdin closes when run.py exits, even killed, and so must we.
const commands = createInterface({ input: process.stdin });
commands.on("close", exit);
commands.on("line", (line) => {
  const command = line.trim();
  if (command === "start") {
    histogram = new Uint32Array(MAX_US / BUCKET_US + 1);
    afterMark = p99BeforeMark = null;
    received = sampled = sampledAfterMark = gaps = duplicates = maxLatencyUs = 0;
    measuring = true;
    loopDelay.reset();
    loopDelay.enable();
    gcPauses = [];
    process.stdout.write(JSON.stringify({ phase: "started" }) + "\n");
  } else if (command === "mark") {
    p99BeforeMark = percentile(0.99);
    afterMark = new Uint32Array(MAX_US / BUCKET_US + 1);
    sampledAfterMark = 0;
    process.stdout.write(JSON.stringify({ phase: "marked" }) + "\n");
  } else if (command === "report") {
    process.stdout.write(JSON.stringify(report()) + "\n");
  } else if (command.startsWith("tally ")) {
    const [after, last] = command.split(" ").slice(1).map(Number);
    process.stdout.write(JSON.stringify(tally(after, last)) + "\n");
  } else if (command === "exit") {
    exit();
  }
});
process.stdout.write(JSON.stringify(await connectAll()) + "\n");
