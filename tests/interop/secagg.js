// SecAgg+ client side in Node.js, written from docs/protocol.md §6 (payload layouts, primitives, graph, masking).
// Used by client.js for PRIVACY_MODE_SECAGG tasks. Node's crypto provides X25519, HKDF, AES-GCM, AES-CTR, Ed25519.
'use strict';

const crypto = require('crypto');

const MAGIC = Buffer.from('MSA1');
const SPECS = {
  1: ['SetupConfig', [['round_id', 'str'], ['client_ids', 'strs'], ['threshold', 'u32'], ['degree', 'u32'],
    ['max_colluders', 'u32'], ['vector_length', 'u32'], ['weights', 'f64arr'], ['frac_bits', 'u32'],
    ['value_range', 'f64'], ['mod_bits', 'u32'], ['weight_cap', 'f64'], ['out_of_range', 'str'],
    ['dp_sigma', 'f64'], ['dp_min_survivors', 'u32']]],
  2: ['AdvertiseKeys', [['round_id', 'str'], ['client_id', 'str'], ['identity_proof', 'bytes'], ['enc_pk', 'bytes'],
    ['mask_pk', 'bytes'], ['config_digest', 'bytes'], ['nonce_commit', 'bytes'], ['signature', 'bytes']]],
  3: ['PeerKeys', [['round_id', 'str'], ['adverts', 'map']]],
  10: ['NonceReveal', [['round_id', 'str'], ['client_id', 'str'], ['nonce', 'bytes']]],
  11: ['NonceReveals', [['round_id', 'str'], ['nonces', 'map']]],
  4: ['EncryptedShares', [['round_id', 'str'], ['client_id', 'str'], ['shares', 'map']]],
  5: ['MaskedInput', [['round_id', 'str'], ['client_id', 'str'], ['masked', 'bytes']]],
  6: ['SurvivorSet', [['round_id', 'str'], ['survivors', 'strs']]],
  7: ['ConsistencySig', [['round_id', 'str'], ['client_id', 'str'], ['signature', 'bytes']]],
  8: ['UnmaskRequest', [['round_id', 'str'], ['survivors', 'strs'], ['signatures', 'map']]],
  9: ['UnmaskShares', [['round_id', 'str'], ['client_id', 'str'], ['b_shares', 'map'], ['sk_shares', 'map']]],
};
const KIND = Object.fromEntries(Object.entries(SPECS).map(([k, [name]]) => [name, Number(k)]));

// ---- payload codec (§6.2): big-endian, canonical, no slack ---------------------------------------------------------
function u32(v) { const b = Buffer.alloc(4); b.writeUInt32BE(v); return b; }
function str(s) { const b = Buffer.from(s, 'utf8'); const h = Buffer.alloc(2); h.writeUInt16BE(b.length); return Buffer.concat([h, b]); }
function bytes(b) { return Buffer.concat([u32(b.length), b]); }
function byteOrder(a, b) { return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8')); }

function encode(name, msg) {
  const kind = KIND[name];
  const parts = [MAGIC, Buffer.from([kind])];
  for (const [f, t] of SPECS[kind][1]) {
    const v = msg[f];
    if (t === 'str') parts.push(str(v));
    else if (t === 'bytes') parts.push(bytes(v));
    else if (t === 'u32') parts.push(u32(v));
    else if (t === 'f64') { const b = Buffer.alloc(8); b.writeDoubleBE(v); parts.push(b); }
    else if (t === 'strs') { parts.push(u32(v.length)); for (const s of v) parts.push(str(s)); }
    else if (t === 'map') {
      const keys = Object.keys(v).sort(byteOrder);
      parts.push(u32(keys.length));
      for (const k of keys) { parts.push(str(k)); parts.push(bytes(v[k])); }
    } else if (t === 'f64arr') {
      const b = Buffer.alloc(v.length * 8);
      v.forEach((x, k) => b.writeDoubleBE(x, k * 8));
      parts.push(bytes(b));
    } else throw new Error(`cannot encode ${t}`);
  }
  return Buffer.concat(parts);
}

function decode(name, data) {
  const kind = KIND[name];
  let i = 0;
  const take = (n) => { if (i + n > data.length) throw new Error(`${name}: truncated`); const b = data.subarray(i, i + n); i += n; return b; };
  if (!take(4).equals(MAGIC)) throw new Error(`${name}: bad magic`);
  if (take(1)[0] !== kind) throw new Error(`${name}: wrong kind`);
  const rstr = () => take(take(2).readUInt16BE()).toString('utf8');
  const rbytes = () => Buffer.from(take(take(4).readUInt32BE()));
  const out = {};
  for (const [f, t] of SPECS[kind][1]) {
    if (t === 'str') out[f] = rstr();
    else if (t === 'bytes') out[f] = rbytes();
    else if (t === 'u32') out[f] = take(4).readUInt32BE();
    else if (t === 'f64') out[f] = take(8).readDoubleBE();
    else if (t === 'strs') { const n = take(4).readUInt32BE(); out[f] = []; for (let k = 0; k < n; k++) out[f].push(rstr()); }
    else if (t === 'map') {
      const n = take(4).readUInt32BE(); out[f] = {}; let last = null;
      for (let k = 0; k < n; k++) {
        const key = rstr();
        if (last !== null && byteOrder(key, last) <= 0) throw new Error(`${name}: map keys not strictly increasing`);
        last = key; out[f][key] = rbytes();
      }
    } else if (t === 'f64arr') {
      const b = rbytes(); out[f] = [];
      for (let k = 0; k < b.length; k += 8) out[f].push(b.readDoubleBE(k));
    }
  }
  if (i !== data.length) throw new Error(`${name}: trailing bytes`);
  return out;
}

// ---- primitives (§6.3) ---------------------------------------------------------------------------------------------
const sha256 = (...parts) => crypto.createHash('sha256').update(Buffer.concat(parts)).digest();
const bar = (parts) => Buffer.concat(parts.flatMap((p, k) => (k ? [Buffer.from('|'), p] : [p])));
const X25519_SPKI = Buffer.from('302a300506032b656e032100', 'hex');
const X25519_PKCS8 = Buffer.from('302e020100300506032b656e04220420', 'hex');

function newX25519() {
  const { privateKey, publicKey } = crypto.generateKeyPairSync('x25519');
  const raw = privateKey.export({ format: 'der', type: 'pkcs8' }).subarray(-32);
  return { sk: privateKey, skRaw: Buffer.from(raw), pk: Buffer.from(publicKey.export({ format: 'der', type: 'spki' }).subarray(-32)) };
}
function derive(sk, peerPk, roundId, purpose, a, b) {
  const pub = crypto.createPublicKey({ key: Buffer.concat([X25519_SPKI, peerPk]), format: 'der', type: 'spki' });
  const shared = crypto.diffieHellman({ privateKey: sk, publicKey: pub });
  const [lo, hi] = byteOrder(a, b) <= 0 ? [a, b] : [b, a];
  const info = Buffer.concat([Buffer.from('mor-secagg/'), Buffer.from(purpose), Buffer.from([0]), Buffer.from(lo),
    Buffer.from([0]), Buffer.from(hi)]);
  const salt = sha256(Buffer.from('mor-secagg-round\0'), Buffer.from(roundId));
  return Buffer.from(crypto.hkdfSync('sha256', shared, salt, info, 32));
}
function gcmEncrypt(key, plain, aad) {
  const nonce = crypto.randomBytes(12);
  const c = crypto.createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(aad);
  const ct = Buffer.concat([c.update(plain), c.final()]);
  return Buffer.concat([nonce, ct, c.getAuthTag()]);
}
function gcmDecrypt(key, blob, aad) {
  const d = crypto.createDecipheriv('aes-256-gcm', key, blob.subarray(0, 12));
  d.setAAD(aad);
  d.setAuthTag(blob.subarray(blob.length - 16));
  return Buffer.concat([d.update(blob.subarray(12, blob.length - 16)), d.final()]);
}
function prg(key, n, bits, tag) {  // AES-256-CTR keystream of zero bytes, little-endian words
  const iv = Buffer.concat([Buffer.from(tag), Buffer.alloc(15)]);
  const c = crypto.createCipheriv('aes-256-ctr', key, iv);
  const ks = Buffer.concat([c.update(Buffer.alloc(n * bits / 8)), c.final()]);
  const out = [];
  for (let k = 0; k < n; k++) out.push(bits === 64 ? ks.readBigUInt64LE(k * 8) : BigInt(ks.readUInt32LE(k * 4)));
  return out;
}
const P = (1n << 256n) + 297n;
function randBelow(p) {
  for (;;) { const v = BigInt('0x' + crypto.randomBytes(33).toString('hex')) & ((1n << 257n) - 1n); if (v < p) return v; }
}
function shamirSplit(secret, xs, t) {
  const coeffs = [BigInt('0x' + secret.toString('hex'))];
  for (let k = 1; k < t; k++) coeffs.push(randBelow(P));
  return xs.map((x) => { let acc = 0n; for (let k = coeffs.length - 1; k >= 0; k--) acc = (acc * BigInt(x) + coeffs[k]) % P; return acc; });
}
const share33 = (y) => Buffer.from(y.toString(16).padStart(66, '0'), 'hex');
const commitNonce = (rid, cid, nonce) => sha256(bar([Buffer.from('mor-secagg/nonce'), Buffer.from(rid), Buffer.from(cid), nonce]));

function graphSeed(configDigest, nonces) {
  const parts = [Buffer.from('mor-secagg-graph-seed\0'), configDigest];
  for (const cid of Object.keys(nonces).sort(byteOrder)) {
    const b = Buffer.from(cid); const h = Buffer.alloc(2); h.writeUInt16BE(b.length);
    parts.push(h, b, nonces[cid]);
  }
  return sha256(...parts);
}
function neighbours(ids, degree, seed, me) {
  const order = [...ids].sort(byteOrder);
  if (degree >= order.length - 1) return order.filter((c) => c !== me);
  let ctr = 0n; let buf = [];
  const word = () => {
    if (!buf.length) {
      const c = Buffer.alloc(8); c.writeBigUInt64BE(ctr++);
      const blk = sha256(Buffer.from('mor-secagg-graph-order\0'), seed, c);
      buf = [0, 8, 16, 24].map((k) => blk.readBigUInt64BE(k));
    }
    return buf.shift();
  };
  for (let i = order.length - 1; i > 0; i--) {
    const bound = BigInt(i + 1); const limit = (1n << 64n) - ((1n << 64n) % bound);
    let x = word(); while (x >= limit) x = word();
    const j = Number(x % bound); [order[i], order[j]] = [order[j], order[i]];
  }
  const n = order.length; const pos = order.indexOf(me); const h = degree / 2; const out = [];
  for (let d = -h; d <= h; d++) if (d) out.push(order[((pos + d) % n + n) % n]);
  return out;
}
function roundHalfEven(v) {
  const f = Math.floor(v); const r = v - f;
  if (r > 0.5) return f + 1; if (r < 0.5) return f; return f % 2 === 0 ? f : f + 1;
}

// ---- one client's round (§6.1, §6.4) ------------------------------------------------------------------------------
class SecAggRound {
  constructor(roundId, clientId, identityKeyPem, identityCertPem, caPem, scores) {
    Object.assign(this, { roundId, clientId, scores });
    this.idKey = crypto.createPrivateKey(identityKeyPem);
    this.proof = identityCertPem;
    this.ca = new crypto.X509Certificate(caPem);
    this.next = 'setup';
  }
  handle(stage, payload) {
    if (stage !== this.next) throw new Error(`got stage ${stage}, expected ${this.next}`);
    const fn = { setup: 'setup', reveal: 'reveal', share_keys: 'shareKeys', collect_masked: 'collectMasked',
      consistency: 'consistency', unmask: 'unmask' }[stage];
    const out = this[fn](payload);
    this.next = { setup: 'reveal', reveal: 'share_keys', share_keys: 'collect_masked',
      collect_masked: 'consistency', consistency: 'unmask', unmask: 'done' }[stage];
    return out;
  }
  setup(payload) {
    const cfg = decode('SetupConfig', payload);
    if (cfg.round_id !== this.roundId || !cfg.client_ids.includes(this.clientId)) throw new Error('not my round');
    if (cfg.dp_sigma > 0) throw new Error('secagg+dp is not implemented by this interop client');
    if (this.scores.length !== cfg.vector_length) throw new Error('vector length mismatch');
    this.cfg = cfg; this.digest = sha256(payload);
    const n = cfg.client_ids.length; const m = cfg.vector_length; const me = cfg.client_ids.indexOf(this.clientId);
    this.w = cfg.weights.length === n ? Array(m).fill(cfg.weights[me]) : cfg.weights.slice(me * m, (me + 1) * m);
    this.enc = newX25519(); this.mask = newX25519(); this.nonce = crypto.randomBytes(32);
    const adv = { round_id: this.roundId, client_id: this.clientId, identity_proof: this.proof, enc_pk: this.enc.pk,
      mask_pk: this.mask.pk, config_digest: this.digest, nonce_commit: commitNonce(this.roundId, this.clientId, this.nonce) };
    adv.signature = crypto.sign(null, this.advSigned(adv), this.idKey);
    this.advert = encode('AdvertiseKeys', adv);
    return this.advert;
  }
  advSigned(a) {
    return bar([Buffer.from('mor-secagg/advertise/v2'), Buffer.from(a.round_id), Buffer.from(a.client_id), a.enc_pk,
      a.mask_pk, a.config_digest, a.nonce_commit]);
  }
  peerKey(cid, proof) {  // identity certificate: issued by the federation CA, names cid, valid now
    const cert = new crypto.X509Certificate(proof);
    if (!cert.verify(this.ca.publicKey)) throw new Error(`identity certificate of ${cid} not issued by the CA`);
    if (!/(^|\n)CN=([^\n]*)/.test(cert.subject) || cert.subject.match(/CN=([^\n]*)/)[1] !== cid) throw new Error(`identity certificate names another client than ${cid}`);
    const now = Date.now();
    if (now < Date.parse(cert.validFrom) || now > Date.parse(cert.validTo)) throw new Error(`identity certificate of ${cid} expired`);
    return cert.publicKey;
  }
  reveal(payload) {
    const msg = decode('PeerKeys', payload);
    if (!msg.adverts[this.clientId] || !msg.adverts[this.clientId].equals(this.advert)) throw new Error('own advert altered');
    this.peers = {};
    for (const [cid, blob] of Object.entries(msg.adverts)) {
      if (cid === this.clientId) continue;
      if (!this.cfg.client_ids.includes(cid)) throw new Error(`unknown client ${cid}`);
      const adv = decode('AdvertiseKeys', blob);
      if (adv.client_id !== cid || adv.round_id !== this.roundId) throw new Error(`advert of ${cid} misattributed`);
      const pk = this.peerKey(cid, adv.identity_proof);
      if (!crypto.verify(null, this.advSigned(adv), pk, adv.signature)) throw new Error(`bad signature of ${cid}`);
      if (!adv.config_digest.equals(this.digest)) throw new Error(`${cid} saw another config`);
      this.peers[cid] = { pk, adv };
    }
    return encode('NonceReveal', { round_id: this.roundId, client_id: this.clientId, nonce: this.nonce });
  }
  shareKeys(payload) {
    const msg = decode('NonceReveals', payload);
    if (!msg.nonces[this.clientId] || !msg.nonces[this.clientId].equals(this.nonce)) throw new Error('own nonce altered');
    for (const [cid, nonce] of Object.entries(msg.nonces)) {
      if (cid === this.clientId) continue;
      if (!this.peers[cid] || !commitNonce(this.roundId, cid, nonce).equals(this.peers[cid].adv.nonce_commit)) throw new Error(`nonce of ${cid} does not match`);
    }
    const seed = graphSeed(this.digest, msg.nonces);
    this.nbrs = neighbours(this.cfg.client_ids, this.cfg.degree, seed, this.clientId).filter((c) => this.peers[c] && msg.nonces[c]);
    const holders = [...this.nbrs, this.clientId].sort(byteOrder);
    if (holders.length < this.cfg.threshold) throw new Error('too few share holders');
    this.b = crypto.randomBytes(32);
    const xs = holders.map((c) => this.cfg.client_ids.indexOf(c) + 1);
    const bSh = shamirSplit(this.b, xs, this.cfg.threshold); const skSh = shamirSplit(this.mask.skRaw, xs, this.cfg.threshold);
    this.received = {}; const out = {};
    holders.forEach((c, k) => {
      if (c === this.clientId) { this.received[c] = [bSh[k], skSh[k]]; return; }
      const key = derive(this.enc.sk, this.peers[c].adv.enc_pk, this.roundId, 'enc', this.clientId, c);
      out[c] = gcmEncrypt(key, Buffer.concat([share33(bSh[k]), share33(skSh[k])]), this.aad(this.clientId, c));
    });
    return encode('EncryptedShares', { round_id: this.roundId, client_id: this.clientId, shares: out });
  }
  aad(from, to) { return bar([Buffer.from('mor-secagg/share'), Buffer.from(this.roundId), Buffer.from(from), Buffer.from(to)]); }
  collectMasked(payload) {
    const msg = decode('EncryptedShares', payload);
    if (msg.client_id !== this.clientId) throw new Error('shares for another client');
    for (const [from, blob] of Object.entries(msg.shares)) {
      if (!this.nbrs.includes(from)) throw new Error(`share from non-neighbour ${from}`);
      const key = derive(this.enc.sk, this.peers[from].adv.enc_pk, this.roundId, 'enc', this.clientId, from);
      const pt = gcmDecrypt(key, blob, this.aad(from, this.clientId));
      this.received[from] = [BigInt('0x' + pt.subarray(0, 33).toString('hex')), BigInt('0x' + pt.subarray(33).toString('hex'))];
    }
    this.u2 = new Set([...Object.keys(msg.shares), this.clientId]);
    const { value_range: R, frac_bits: fb, mod_bits: bits } = this.cfg;
    let bad = 0;
    const q = this.scores.map((x, k) => {
      if (Math.abs(x) > R) { if (this.cfg.out_of_range === 'error') throw new Error('score out of range'); bad++; }
      return BigInt(roundHalfEven(Math.max(-R, Math.min(R, x)) * this.w[k] * 2 ** fb));
    });
    q.push(BigInt(bad));
    const mod = 1n << BigInt(bits); const m = q.length;
    let y = q.map((v) => ((v % mod) + mod) % mod);
    const self = prg(this.b, m, bits, 'S');
    y = y.map((v, k) => (v + self[k]) % mod);
    for (const j of [...this.u2].filter((c) => c !== this.clientId).sort(byteOrder)) {
      const s = derive(this.mask.sk, this.peers[j].adv.mask_pk, this.roundId, 'mask', this.clientId, j);
      const mk = prg(s, m, bits, 'P'); const plus = byteOrder(this.clientId, j) < 0;
      y = y.map((v, k) => (plus ? v + mk[k] : v - mk[k] + mod) % mod);
    }
    const out = Buffer.alloc(m * bits / 8);
    y.forEach((v, k) => (bits === 64 ? out.writeBigUInt64LE(v, k * 8) : out.writeUInt32LE(Number(v), k * 4)));
    return encode('MaskedInput', { round_id: this.roundId, client_id: this.clientId, masked: out });
  }
  consistencySigned(survivors, cid) {
    const joined = Buffer.concat([...survivors].sort(byteOrder).flatMap((s, k) => (k ? [Buffer.from([0]), Buffer.from(s)] : [Buffer.from(s)])));
    return bar([Buffer.from('mor-secagg/consistency'), Buffer.from(this.roundId), Buffer.from(cid), joined]);
  }
  consistency(payload) {
    const msg = decode('SurvivorSet', payload);
    if (!msg.survivors.includes(this.clientId) || msg.survivors.length < this.cfg.threshold) throw new Error('bad survivor set');
    this.u3 = msg.survivors;
    return encode('ConsistencySig', { round_id: this.roundId, client_id: this.clientId,
      signature: crypto.sign(null, this.consistencySigned(this.u3, this.clientId), this.idKey) });
  }
  unmask(payload) {
    const msg = decode('UnmaskRequest', payload);
    if ([...msg.survivors].sort(byteOrder).join('\0') !== [...this.u3].sort(byteOrder).join('\0')) throw new Error('survivor set changed');
    let valid = 0;
    for (const [cid, sig] of Object.entries(msg.signatures)) {
      const pk = cid === this.clientId ? crypto.createPublicKey(this.idKey) : this.peers[cid] && this.peers[cid].pk;
      if (!pk) continue;
      if (!crypto.verify(null, this.consistencySigned(this.u3, cid), pk, sig)) throw new Error(`bad consistency signature of ${cid}`);
      valid++;
    }
    if (valid < this.cfg.threshold) throw new Error('too few consistency signatures');
    const u3 = new Set(this.u3); const bOut = {}; const skOut = {};
    for (const [j, [bs, ss]] of Object.entries(this.received)) {
      if (u3.has(j)) bOut[j] = share33(bs); else if (this.u2.has(j)) skOut[j] = share33(ss);
    }
    return encode('UnmaskShares', { round_id: this.roundId, client_id: this.clientId, b_shares: bOut, sk_shares: skOut });
  }
}

module.exports = { SecAggRound, encode, decode, neighbours, derive, prg, gcmDecrypt, X25519_PKCS8 };
