// Checks this folder's SecAgg+ codec and graph against tests/vectors/secagg_v1.json (run by test_node_client.py).
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const { encode, decode, neighbours, derive, prg, gcmDecrypt, X25519_PKCS8 } = require('./secagg');

const v = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'vectors', 'secagg_v1.json'), 'utf8'));
let checked = 0;
for (const m of v.messages) {
  const data = Buffer.from(m.hex, 'hex');
  const msg = decode(m.type, data);
  for (const [name, kind] of m.spec) {  // bytes-valued fields are hex in the vectors
    if (kind === 'bytes') msg[name] = Buffer.from(m.fields[name], 'hex');
    if (kind === 'map') for (const k of Object.keys(m.fields[name])) msg[name][k] = Buffer.from(m.fields[name][k], 'hex');
  }
  const again = encode(m.type, msg);
  if (!again.equals(data)) throw new Error(`${m.type}: re-encoding differs`);
  checked++;
}
const g = v.primitives.graph;
for (const [c, want] of Object.entries(g.neighbours)) {
  const got = neighbours(Object.keys(g.nonces), g.degree, Buffer.from(g.seed, 'hex'), c).sort();
  if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`neighbours of ${c}: ${got} != ${want}`);
}
const p = v.primitives;
const hex = (h) => Buffer.from(h, 'hex');
const xsk = (h) => crypto.createPrivateKey({ key: Buffer.concat([X25519_PKCS8, hex(h)]), format: 'der', type: 'pkcs8' });
const d = p.derive;
if (derive(xsk(d.alice_sk), hex(d.bob_pk), d.round_id, 'enc', 'alice', 'bob').toString('hex') !== d['enc_key(alice,bob)']) throw new Error('derive enc');
if (derive(xsk(d.bob_sk), hex(d.alice_pk), d.round_id, 'mask', 'bob', 'alice').toString('hex') !== d['mask_key(alice,bob)']) throw new Error('derive mask');
if (prg(hex(p.prg.key), 4, 64, 'P').map(String).join() !== p.prg.pair_u64.join()) throw new Error('prg pair');
if (prg(hex(p.prg.key), 4, 32, 'S').map(Number).join() !== p.prg.self_u32.join()) throw new Error('prg self');
const e = p.share_encryption;
if (gcmDecrypt(hex(e.key), hex(e.blob), hex(e.aad)).toString('hex') !== e.plaintext) throw new Error('gcm');
const s = p.signatures;
const edk = crypto.createPrivateKey({ key: Buffer.concat([Buffer.from('302e020100300506032b657004220420', 'hex'), hex(s.ed25519_seed)]), format: 'der', type: 'pkcs8' });
if (crypto.sign(null, hex(s.advertise_signed_bytes), edk).toString('hex') !== s.advertise_signature) throw new Error('ed25519');
console.log(JSON.stringify({ messages: checked, graph: Object.keys(g.neighbours).length, primitives: 6 }));
