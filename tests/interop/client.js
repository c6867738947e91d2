// A MoR federation client in Node.js, written from proto/mor/v1/federation.proto and docs/protocol.md only.
//
// usage: node client.js --server localhost:PORT --creds DIR [--offset 100] [--modes plain,dp]
//   DIR holds ca.crt, tls.key, tls.crt (from `mor-server pki issue-client` or `sign-csr`).
// Prints one JSON line per event on stdout (welcome, task, ack, heartbeat, end) so a test can follow it.
// Stops cleanly on SIGTERM / SIGINT (half-closes its stream) and exits 0.
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { SecAggRound } = require('./secagg');

const PROTOCOL_REVISION = 2;  // docs/protocol.md, "Versioning"
const SDK_VERSION = 'mor-node-interop/0.1.0';
const MiB = 1 << 20;

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const server = arg('--server');
const creds = arg('--creds');
const offset = Number(arg('--offset', '0'));
const modes = arg('--modes', 'plain').split(',');
const protoFile = arg('--proto', path.join(__dirname, '..', '..', 'proto', 'mor', 'v1', 'federation.proto'));

function emit(event, info) {
  process.stdout.write(JSON.stringify({ event, ...info }) + '\n');
}

const def = protoLoader.loadSync(protoFile, {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const mor = grpc.loadPackageDefinition(def).mor.v1;

// mTLS; the server's certificate carries SANs localhost, 127.0.0.1, ::1. Raise the receive limit: tasks may be as
// large as RegisterResponse.max_message_bytes (16 MiB by default), grpc-js receives only 4 MiB by default.
const sslCreds = grpc.credentials.createSsl(
  fs.readFileSync(path.join(creds, 'ca.crt')),
  fs.readFileSync(path.join(creds, 'tls.key')),
  fs.readFileSync(path.join(creds, 'tls.crt')));
const options = {
  'grpc.max_receive_message_length': 17 * MiB,
  'grpc.max_send_message_length': 17 * MiB,
  'grpc.keepalive_time_ms': 10000,
  'grpc.keepalive_timeout_ms': 10000,
  'grpc.keepalive_permit_without_calls': 1,
};
const client = new mor.Federation(server, sslCreds, options);

// ---- scoring: score = length of the candidate answer + offset (higher is better), item-major ---------------------
function rawScores(task) {
  const out = [];
  for (const item of task.items) for (const c of item.candidates) out.push(c.length + offset);
  return out;
}

// ---- the dp mechanism of docs/protocol.md ("The dp mode") ---------------------------------------------------------
// clip to [-C, C]; sigma = noise_multiplier * 2 C sqrt(m); grid g = C / 2^k, k = max(20, ceil(log2(2^16 C / sigma)));
// release (round_half_even(x/g) + Z) * g with Z ~ N_Z(0, (sigma/g)^2), the discrete Gaussian drawn EXACTLY with
// Canonne-Kamath-Steinke 2020 (Algorithms 1-3) in BigInt rational arithmetic from crypto.randomInt/randomBytes.
function randBelowBig(q) {  // uniform integer in [0, q), rejection sampling (no modulo bias)
  const bits = q.toString(2).length;
  const nbytes = Math.ceil(bits / 8);
  const mask = (1n << BigInt(bits)) - 1n;
  for (;;) {
    const v = BigInt('0x' + crypto.randomBytes(nbytes).toString('hex')) & mask;
    if (v < q) return v;
  }
}
const bernoulli = (p, q) => randBelowBig(q) < p;  // P = p/q
function bernoulliExp(p, q) {  // exp(-p/q), p/q >= 0 (CKS Algorithm 1)
  if (p <= q) {
    let k = 1n;
    while (bernoulli(p, q * k)) k += 1n;
    return k % 2n === 1n;
  }
  for (let i = 0n; i < p / q; i++) if (!bernoulliExp(1n, 1n)) return false;
  return bernoulliExp(p % q, q);
}
function discreteLaplace(t) {  // P(Y = y) ~ exp(-|y|/t), integer t >= 1 (CKS Algorithm 2)
  for (;;) {
    const u = randBelowBig(t);
    if (!bernoulliExp(u, t)) continue;
    let v = 0n;
    while (bernoulliExp(1n, 1n)) v += 1n;
    const neg = bernoulli(1n, 2n);
    if (neg && u === 0n && v === 0n) continue;
    const z = u + t * v;
    return neg ? -z : z;
  }
}
function discreteGaussian(sigma) {  // N_Z(0, sigma^2) (CKS Algorithm 3); sigma >= 2^16 is N / 2^52 exactly
  const N = BigInt(sigma * 2 ** 52);
  const S = 1n << 52n;
  const t = N / S + 1n;
  for (;;) {
    const y = discreteLaplace(t);
    const a = (y < 0n ? -y : y) * t * S * S - N * N;  // (|y| - sigma^2 / t) * t * S^2
    if (bernoulliExp(a * a, 2n * t * t * N * N * S * S)) return y;
  }
}
function roundHalfEven(v) {
  const f = Math.floor(v); const r = v - f;
  if (r > 0.5) return f + 1; if (r < 0.5) return f; return f % 2 === 0 ? f : f + 1;
}
let rhoSpent = 0;  // zCDP of all releases so far: each release is (1 / (2 nm^2))-zCDP (sensitivity / sigma = 1 / nm)
const DELTA = 1e-5;
function dpRelease(scores, clip, nm) {
  const m = scores.length;
  const sigma = nm * 2 * clip * Math.sqrt(m);
  const k = Math.max(20, Math.ceil(Math.log2((2 ** 16) * clip / sigma)));
  const g = clip / 2 ** k;
  const lim = 2 ** k;
  const noised = scores.map((s) => {
    const x = Math.max(-clip, Math.min(clip, s));
    const q = Math.max(-lim, Math.min(lim, roundHalfEven(x / g)));
    return (q + Number(discreteGaussian(sigma / g))) * g;
  });
  rhoSpent += 1 / (2 * nm * nm);
  const eps = rhoSpent + 2 * Math.sqrt(rhoSpent * Math.log(1 / DELTA));  // zCDP -> (eps, delta): informational
  return { noised, eps };
}

// ---- session lifecycle: Register, then Session (hello -> welcome -> tasks -> reports/acks) -------------------------
const card = {
  architecture: 'node-length', parameter_count: 0, training_epsilon: Infinity, training_delta: 0,
  supported_modes: modes.map((m) => ({ plain: 'PRIVACY_MODE_PLAIN', dp: 'PRIVACY_MODE_DP', secagg: 'PRIVACY_MODE_SECAGG' })[m]),
  privacy_unit: 'pair', domain: 'interop', training_examples: 0,
  card_json: JSON.stringify({ architecture: 'node-length', language: 'javascript' }),
};

const idCertPath = path.join(creds, 'identity.crt');
const identityCert = fs.existsSync(idCertPath) ? fs.readFileSync(idCertPath) : Buffer.alloc(0);
const rounds = {};  // SecAgg+ rounds in progress: round_id -> SecAggRound

client.Register({ card, sdk_version: SDK_VERSION, identity_certificate: identityCert }, { deadline: Date.now() + 15000 }, (err, resp) => {
  if (err) {
    emit('end', { stage: 'register', code: err.code, details: err.details });
    process.exit(3);
  }
  emit('registered', { client_id: resp.client_id, max_message_bytes: Number(resp.max_message_bytes) });
  const clientId = resp.client_id;
  const call = client.Session();
  function secaggAnswer(r, stage, payload) {
    try {
      const out = r.handle(stage, payload);
      emit('secagg', { round_id: r.roundId, stage });
      call.write({ report: { round_id: r.roundId, secagg: { round_id: r.roundId, stage, payload: out } } });
      if (r.next === 'done') delete rounds[r.roundId];
    } catch (e) {
      delete rounds[r.roundId];
      emit('secagg_error', { round_id: r.roundId, stage, error: e.message });
      call.write({ refusal: { round_id: r.roundId, reason: `secure aggregation aborted: ${e.message}`, code: 10 } });
    }
  }
  let stopping = false;
  const stop = () => { if (!stopping) { stopping = true; call.end(); } };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  call.write({ hello: { sdk_version: SDK_VERSION, protocol_revision: PROTOCOL_REVISION } });
  call.on('data', (msg) => {
    switch (msg.body) {
      case 'welcome':
        emit('welcome', { client_id: msg.welcome.client_id, revision: msg.welcome.protocol_revision });
        call.write({ heartbeat: { unix_ms: String(Date.now()) } });
        break;
      case 'heartbeat':
        emit('heartbeat', { unix_ms: msg.heartbeat.unix_ms });
        break;
      case 'task': {
        const t = msg.task;
        const mode = { PRIVACY_MODE_PLAIN: 'plain', PRIVACY_MODE_DP: 'dp', PRIVACY_MODE_SECAGG: 'secagg' }[t.mode] || t.mode;
        emit('task', { round_id: t.round_id, mode, items: t.items.length, score_bound: t.score_bound });
        const scores = rawScores(t);
        if (mode === 'secagg' && modes.includes('secagg') && t.secagg) {
          try {
            const r = new SecAggRound(t.round_id, clientId, fs.readFileSync(path.join(creds, 'identity.key')),
              identityCert, fs.readFileSync(path.join(creds, 'ca.crt')), scores);
            rounds[t.round_id] = r;
            secaggAnswer(r, t.secagg.stage, t.secagg.payload);
          } catch (e) {
            call.write({ refusal: { round_id: t.round_id, reason: `secure aggregation: ${e.message}`, code: 10 } });
          }
        } else if (mode === 'plain' && modes.includes('plain')) {
          call.write({ report: { round_id: t.round_id, plain: { scores } } });
        } else if (mode === 'dp' && modes.includes('dp') && t.dp) {
          const { noised, eps } = dpRelease(scores, t.dp.clip, t.dp.noise_multiplier);
          call.write({ report: { round_id: t.round_id, dp: {
            scores: noised, clip: t.dp.clip, noise_multiplier: t.dp.noise_multiplier, epsilon_charged: eps } } });
        } else {
          call.write({ refusal: { round_id: t.round_id, reason: `mode ${mode} not enabled`, code: 9 } });
        }
        break;
      }
      case 'ack':
        emit('ack', { round_id: msg.ack.round_id, code: msg.ack.code, field: msg.ack.field, message: msg.ack.message });
        break;
      case 'secagg': {
        const r = rounds[msg.secagg.round_id];
        if (r) secaggAnswer(r, msg.secagg.stage, msg.secagg.payload);
        break;
      }
      case 'cancelled':
        delete rounds[msg.cancelled.round_id];
        emit('cancelled', { round_id: msg.cancelled.round_id });
        break;
      default:
        emit('other', { body: msg.body });
    }
  });
  call.on('error', (err) => {
    emit('end', { stage: 'session', code: err.code, details: err.details });
    process.exit(stopping && err.code === grpc.status.CANCELLED ? 0 : 4);
  });
  call.on('end', () => {
    emit('end', { stage: 'session', code: 0 });
    process.exit(0);
  });
});
