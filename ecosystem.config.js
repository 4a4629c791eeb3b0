// PM2 ecosystem of the KEKTECH realtime backend (operator's guide: docs/pm2.md).
//
//   pm2 start ecosystem.config.js        pm2 status        pm2 logs kektech-event-indexer
//   pm2 restart kektech-websocket-server pm2 reload ecosystem.config.js --update-env
//
// Apps
//   kektech-event-indexer     python -m indexer run, one instance (a second one would only
//                             wait as a standby for the write lease).
//   kektech-websocket-server  python -m broadcaster, N instances in fork mode (PM2's cluster
//                             mode is Node-only). Instance i listens on WS_PORT + i (or on
//                             WS_PORT itself with WS_REUSE_PORT=true) and
//                             BROADCASTER_HTTP_PORT + i: PM2 gives each instance its index in
//                             BROADCASTER_INSTANCE (instance_var) and the broadcaster's settings
//                             add it to the base ports. Per-instance ports cannot be written
//                             here: `increment_var` covers one variable only, and
//                             `pm2 reload ecosystem.config.js --update-env` gives every instance
//                             of an app the same env (both verified with PM2 7.0.4).
//
// Settings and secrets are NOT in this file. Both services read `.env` from their working
// directory (KEKTECH_WORKDIR); /etc/kektech/<service>.env, when present, is merged into the
// app's env (per-service REDIS_URL users, docs/deployment.md); environment variables beat .env.
// Logging is left to auto-detection: not on a TTY under PM2, so JSON lines, never colours.
//
// Read when PM2 evaluates this file (pm2 start/reload/startOrReload), all optional, from PM2's
// environment or else from <KEKTECH_SERVICE_ENV_DIR>/ecosystem.env (below):
//   KEKTECH_ROOT                        checkout holding .venv       (directory of this file)
//   KEKTECH_PYTHON                      interpreter                  ($KEKTECH_ROOT/.venv/bin/python)
//   KEKTECH_WORKDIR                     cwd of both apps, its .env   ($KEKTECH_ROOT)
//   KEKTECH_LOG_DIR                     PM2 log files                (/var/log/kektech if it
//                                                                    exists, else ~/.pm2/logs)
//   KEKTECH_BROADCASTER_INSTANCES       broadcaster instances N      (2)
//   KEKTECH_WS_BASE_PORT                WS_PORT of instance 0        (3180)
//   KEKTECH_BROADCASTER_HTTP_BASE_PORT  health/metrics of instance 0 (9465)
// and from the environment only (it locates that file):
//   KEKTECH_SERVICE_ENV_DIR             <service>.env, ecosystem.env (/etc/kektech)
// Changing N or the ports also means changing nginx.conf's upstreams (docs/nginx.md).
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const env = process.env;
const SERVICE_ENV_DIR = env.KEKTECH_SERVICE_ENV_DIR || "/etc/kektech";

// The operator's choices among the KEKTECH_* settings persist in one file, because PM2
// evaluates this file again on every reload with the environment of whoever runs pm2, and
// that environment does not keep them: deploy/update.sh clears its own (env -i), sudo's
// env_reset drops them, the next login shell lacks them. A port set only there would
// silently go back to its default on the next `pm2 reload ... --update-env`. Not in .env:
// that is the services' file, in python-dotenv's syntax, and they refuse names they do not
// read. /etc/kektech already holds the deployment's per-service files, outside the checkout
// (a re-clone or `git reset --hard` keeps it). The environment still wins (tests, one-offs).
const SETTINGS_FILE = path.join(SERVICE_ENV_DIR, "ecosystem.env");
const SETTINGS = [
  "KEKTECH_ROOT",
  "KEKTECH_PYTHON",
  "KEKTECH_WORKDIR",
  "KEKTECH_LOG_DIR",
  "KEKTECH_BROADCASTER_INSTANCES",
  "KEKTECH_WS_BASE_PORT",
  "KEKTECH_BROADCASTER_HTTP_BASE_PORT",
];

// NAME=value lines (value optionally in matching quotes), blank lines and # comments. Any
// other line, a name set twice or a name this file does not read is refused with its line
// number: skipping it would run the apps on a default the operator did not choose.
function savedSettings() {
  let text;
  try {
    text = fs.readFileSync(SETTINGS_FILE, "utf8");
  } catch (error) {
    if (error.code === "ENOENT") return {};
    throw new Error(`cannot read ${SETTINGS_FILE}: ${error.message}`);
  }
  const saved = {};
  text.split(/\r?\n/).forEach((line, index) => {
    const number = index + 1;
    const where = `${SETTINGS_FILE} line ${number}`;
    if (line.trim() === "" || line.trimStart().startsWith("#")) return;
    const match = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$/.exec(line);
    if (!match) throw new Error(`${where} is not NAME=value`);
    const [, name, raw] = match;
    if (name === "KEKTECH_SERVICE_ENV_DIR") {
      throw new Error(`${where}: ${name} locates this file, so only the environment sets it`);
    }
    if (!SETTINGS.includes(name)) {
      if (!name.startsWith("KEKTECH_")) {
        throw new Error(`${where}: ${name} is a setting of the services: it belongs in .env`);
      }
      const close = closest(name, SETTINGS);
      const hint = close ? `did you mean ${close}?` : `known: ${SETTINGS.join(", ")}`;
      throw new Error(`${where}: unknown variable ${name} (${hint})`);
    }
    if (saved[name]) {
      throw new Error(`${where}: ${name} is already set on line ${saved[name].line}`);
    }
    saved[name] = { value: raw.replace(/^(['"])(.*)\1$/, "$2"), line: number };
  });
  return saved;
}

// The known name probably meant: one holding all the words of `name` in order
// (KEKTECH_WS_PORT: KEKTECH_WS_BASE_PORT), else the nearest within a third of its length in
// edits (KEKTECH_BROADCASTER_INSTANCE: ..._INSTANCES).
function closest(name, names) {
  const words = name.split("_");
  const holding = names.find((candidate) => {
    let at = 0;
    for (const word of candidate.split("_")) if (word === words[at]) at += 1;
    return at === words.length;
  });
  if (holding) return holding;
  let best = null;
  let bestDistance = Math.floor(name.length / 3) + 1;
  for (const candidate of names) {
    const row = Array.from({ length: candidate.length + 1 }, (_, j) => j);
    for (let i = 1; i <= name.length; i++) {
      let diagonal = row[0];
      row[0] = i;
      for (let j = 1; j <= candidate.length; j++) {
        const above = row[j];
        const cost = name[i - 1] === candidate[j - 1] ? 0 : 1;
        row[j] = Math.min(row[j] + 1, row[j - 1] + 1, diagonal + cost);
        diagonal = above;
      }
    }
    if (row[candidate.length] < bestDistance) {
      best = candidate;
      bestDistance = row[candidate.length];
    }
  }
  return best;
}

const SAVED = savedSettings();

// { value, source } of a setting: PM2's environment, else ecosystem.env, else undefined.
// An empty value counts as unset.
function setting(name) {
  if (env[name] !== undefined && env[name] !== "") {
    return { value: env[name], source: "the environment" };
  }
  const saved = SAVED[name];
  if (saved && saved.value !== "") {
    return { value: saved.value, source: `${SETTINGS_FILE} line ${saved.line}` };
  }
  return { value: undefined, source: "" };
}

function text(name, fallback) {
  const { value } = setting(name);
  return value === undefined ? fallback : value;
}

function integer(name, fallback, low, high) {
  const { value: raw, source } = setting(name);
  if (raw === undefined) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < low || value > high) {
    throw new Error(
      `${name} must be an integer from ${low} to ${high}, not ${JSON.stringify(raw)} (${source})`,
    );
  }
  return value;
}

const ROOT = path.resolve(text("KEKTECH_ROOT", __dirname));
const PYTHON = text("KEKTECH_PYTHON", path.join(ROOT, ".venv", "bin", "python"));
const WORKDIR = path.resolve(text("KEKTECH_WORKDIR", ROOT));
const LOG_DIR = text(
  "KEKTECH_LOG_DIR",
  fs.existsSync("/var/log/kektech") ? "/var/log/kektech" : "",
);
const INSTANCES = integer("KEKTECH_BROADCASTER_INSTANCES", 2, 1, 64);
const WS_BASE_PORT = integer("KEKTECH_WS_BASE_PORT", 3180, 1, 65535 - INSTANCES);
const HTTP_BASE_PORT = integer("KEKTECH_BROADCASTER_HTTP_BASE_PORT", 9465, 1, 65535 - INSTANCES);
// Instance i takes WS base + i and HTTP base + i: overlapping ranges would give one
// instance's WebSocket port to another's health and metrics, and one of the two would
// crash-loop on "address already in use". (With WS_REUSE_PORT the WebSocket range is one
// port, but keeping the ranges apart costs nothing.)
if (Math.abs(WS_BASE_PORT - HTTP_BASE_PORT) < INSTANCES) {
  const range = (base) => (INSTANCES === 1 ? `${base}` : `${base}-${base + INSTANCES - 1}`);
  throw new Error(
    `KEKTECH_WS_BASE_PORT (${range(WS_BASE_PORT)}) and KEKTECH_BROADCASTER_HTTP_BASE_PORT ` +
      `(${range(HTTP_BASE_PORT)}) overlap with ${INSTANCES} broadcaster instance(s): ` +
      `choose bases at least KEKTECH_BROADCASTER_INSTANCES apart`,
  );
}

// KEY=VALUE lines of /etc/kektech/<service>.env (written by deploy/provision.sh); a missing
// file is normal on a development machine.
function serviceEnv(service) {
  const file = path.join(SERVICE_ENV_DIR, `${service}.env`);
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (error) {
    if (error.code === "ENOENT") return {};
    throw new Error(`cannot read ${file}: ${error.message}`);
  }
  const values = {};
  for (const line of text.split(/\r?\n/)) {
    const match = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$/.exec(line);
    if (!match || line.trimStart().startsWith("#")) continue;
    values[match[1]] = match[2].replace(/^(['"])(.*)\1$/, "$2");
  }
  return values;
}

function logFiles(app) {
  if (!LOG_DIR) return {};
  return {
    out_file: path.join(LOG_DIR, `${app}.out.log`),
    error_file: path.join(LOG_DIR, `${app}.err.log`),
  };
}

const common = {
  script: PYTHON,
  interpreter: "none", // run the virtualenv's python itself, with args
  cwd: WORKDIR,
  exec_mode: "fork",
  autorestart: true,
  // Readiness: the process is `launching` until it writes "ready" on PM2's IPC channel
  // (shared/readiness.py); after listen_timeout PM2 marks it online regardless.
  wait_ready: true,
  // Exit 0 is a stop the services were asked for (SIGINT, SIGTERM); failures exit 1. PM2
  // (7.0.4, lib/God.js) takes a launching process's exit for a crash even during
  // `pm2 stop`: it marks the process online first, then restarts it, so a stop of an
  // indexer waiting for its database was undone and a restart left a second, untracked
  // one. Never restarting on 0 keeps every stop a stop.
  stop_exit_codes: [0],
  // Crash loops back off from 100 ms, times 1.5 each time, up to 15 s; reset after 30 s of
  // uptime.
  exp_backoff_restart_delay: 100,
  min_uptime: "10s",
  max_restarts: 10,
  // Instances share one out and one err file; each JSON line carries its own timestamp,
  // so PM2's `time` prefix would only break the lines for log tooling.
  merge_logs: true,
  time: false,
};

module.exports = {
  apps: [
    {
      ...common,
      name: "kektech-event-indexer",
      args: ["-m", "indexer", "run"],
      instances: 1,
      // Migrations, the chain id check and a slow RPC endpoint's retries fit in it.
      listen_timeout: 60000,
      // Stop: SIGINT cancels the batch in flight (Postgres rolls it back) and releases the
      // lease (bounded at 2 s). `pm2 stop` took 2.1 s under chain load, 5.3 s with the CPU
      // saturated (docs/pm2.md); SIGKILL only after 15 s.
      kill_timeout: 15000,
      max_memory_restart: "512M",
      env: { ...serviceEnv("indexer") },
      ...logFiles("kektech-event-indexer"),
    },
    {
      ...common,
      name: "kektech-websocket-server",
      args: ["-m", "broadcaster"],
      instances: INSTANCES,
      instance_var: "BROADCASTER_INSTANCE",
      listen_timeout: 30000,
      // Stop: SIGINT closes every client with 1012 and cuts off those that do not finish
      // the closing handshake within 1 s. `pm2 stop` took 1.6 s with 1,000 clients and
      // 4.2 s with 4,000 on a saturated 2-core machine (docs/pm2.md); SIGKILL after 15 s.
      kill_timeout: 15000,
      max_memory_restart: "768M",
      env: {
        ...serviceEnv("broadcaster"),
        WS_PORT: String(WS_BASE_PORT),
        BROADCASTER_HTTP_PORT: String(HTTP_BASE_PORT),
      },
      ...logFiles("kektech-websocket-server"),
    },
  ],
};
