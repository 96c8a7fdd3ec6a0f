/**
 * Hostile input: a seeded fuzz run of definitely-invalid requests over every endpoint, plus
 * request bodies that never finish arriving.
 *
 * Every generated request is invalid by construction (a defect is added wherever the hostile part
 * alone might still be acceptable), so every answer must be a 4xx in the API error format.
 * Reproduce a failing run with FOREMAN_FUZZ_SEED=<seed> (the seed is in every assertion message);
 * FOREMAN_FUZZ_COUNT=<n> changes the number of generated requests.
 */
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { Readable } from 'node:stream';
import { Pool } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHarness, type Harness } from './support/harness.js';
import { jobCount } from './support/util.js';

const SEED = process.env.FOREMAN_FUZZ_SEED ? Number(process.env.FOREMAN_FUZZ_SEED) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
const COUNT = Number(process.env.FOREMAN_FUZZ_COUNT ?? 2_400);
const BATCH = 50;

// ---------------------------------------------------------------------------
// Seeded PRNG

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  float(): number {
    return this.next();
  }
  /** 0 <= n < max */
  int(max: number): number {
    return Math.floor(this.next() * max);
  }
  range(min: number, max: number): number {
    return min + this.int(max - min + 1);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  /** `len` code points from `alphabet` (split by code point, so no lone surrogates). */
  text(len: number, alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789'): string {
    const chars = Array.from(alphabet);
    let s = '';
    for (let i = 0; i < len; i++) s += chars[this.int(chars.length)];
    return s;
  }
}

// ---------------------------------------------------------------------------
// Cases

type Kind = 'submit' | 'get' | 'artifact' | 'redeliver' | 'unknown';

interface Case {
  kind: Kind;
  label: string;
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
  /** Send the body with Transfer-Encoding: chunked, in random pieces. */
  chunked?: boolean;
  /** Exact statuses the code determines for this case (always a subset of 4xx). */
  status: number[];
  /** Acceptable error codes, when the code determines them. */
  codes?: string[];
}

type Obj = Record<string, unknown>;

const JSON_CT = 'application/json';
/** Content types accepted as JSON (UTF-8; any other declared charset is 415, hardening finding 17). */
const JSON_TYPES = [
  'application/json',
  'application/json; charset=utf-8',
  'application/json;charset=UTF-8',
  'Application/JSON',
  'application/json; charset="utf-8"',
  'application/json ; charset=utf-8',
  'application/json;',
];
/** Content types that are not JSON: 415 even for a perfectly valid job body. */
const NON_JSON_TYPES = [
  'application/json; charset=latin1',
  'application/json; charset=utf-16',
  'text/plain',
  'text/plain; charset=utf-8',
  'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=----fuzz',
  'application/xml',
  'text/xml',
  'text/html',
  'text/json',
  'application/x-json',
  'application/jsonp',
  'application/jsonx',
  'application/vnd.api+json',
  'application/ld+json',
  'application/octet-stream',
  'application/javascript',
  'image/png',
  '*/*',
  'application/*',
  'application/json, text/plain',
  'application json',
  'application/',
  '/json',
  ';',
];

const user = () => [{ role: 'user', content: 'hi' }];
const base = (): Obj => ({ model: 'llama3.2', messages: user() });
const VALID_HOOK = 'http://127.0.0.1:9/hook';
const JOB_STATES = ['queued', 'loading', 'working', 'done', 'failed'];

/** Defines an own enumerable property, so `__proto__` really ends up as a key in JSON.stringify. */
function own(o: Obj, key: string, value: unknown): Obj {
  Object.defineProperty(o, key, { value, enumerable: true, writable: true, configurable: true });
  return o;
}

/** Each defect alone makes an otherwise valid body fail validation. Keyed by the field it touches. */
const DEFECTS: [string, (o: Obj) => void][] = [
  ['model', (o) => void delete o.model],
  ['model', (o) => void (o.model = 42)],
  ['messages', (o) => void delete o.messages],
  ['messages', (o) => void (o.messages = [])],
  ['zz_unknown', (o) => void (o.zz_unknown = true)],
  ['think', (o) => void (o.think = 'extreme')],
  ['stream', (o) => void (o.stream = 'yes')],
  ['keep_alive', (o) => void (o.keep_alive = null)],
  ['metadata', (o) => void (o.metadata = { n: 1 })],
];

function addDefect(rng: Rng, o: Obj, avoid: string[] = []): Obj {
  const options = DEFECTS.filter(([field]) => !avoid.includes(field));
  rng.pick(options)[1](o);
  return o;
}

const PLACEHOLDER = 'ZZ_PLACEHOLDER_ZZ';
/** JSON text of `o` with the `"ZZ_PLACEHOLDER_ZZ"` value replaced by raw JSON text. */
function splice(o: Obj, raw: string): string {
  const text = JSON.stringify(o);
  const i = text.indexOf(`"${PLACEHOLDER}"`);
  if (i < 0) throw new Error('placeholder missing');
  return text.slice(0, i) + raw + text.slice(i + PLACEHOLDER.length + 2);
}

const DEPTH = 10_000;
const deepArray = (n: number) => '['.repeat(n) + ']'.repeat(n);
const deepObject = (n: number, leaf = '1') => '{"a":'.repeat(n) + leaf + '}'.repeat(n);
const deepMixed = (n: number) => {
  let open = '';
  let close = '';
  for (let i = 0; i < n; i++) {
    if (i % 2) {
      open += '[';
      close = ']' + close;
    } else {
      open += '{"k":';
      close = '}' + close;
    }
  }
  return `${open}null${close}`;
};

/** Definitely-invalid values for each field of the submit body. */
const BAD: Record<string, unknown[]> = {
  model: [123, 0, -1, 1.5, true, false, null, [], ['llama3.2'], {}, { name: 'llama3.2' }, '', 'm'.repeat(257)],
  messages: [
    null,
    'hi',
    1,
    true,
    {},
    { role: 'user', content: 'hi' },
    [],
    [null],
    ['hi'],
    [1],
    [[]],
    [{}],
    [{ role: 'user' }],
    [{ content: 'hi' }],
    [{ role: 'robot', content: 'hi' }],
    [{ role: 'USER', content: 'hi' }],
    [{ role: 'user ', content: 'hi' }],
    [{ role: 1, content: 'hi' }],
    [{ role: null, content: 'hi' }],
    [{ role: ['user'], content: 'hi' }],
    [{ role: 'user', content: 1 }],
    [{ role: 'user', content: null }],
    [{ role: 'user', content: ['hi'] }],
    [{ role: 'user', content: { text: 'hi' } }],
    [{ role: 'user', content: true }],
    [{ role: 'user', content: 'hi', images: 'aGk=' }],
    [{ role: 'user', content: 'hi', images: [1] }],
    [{ role: 'user', content: 'hi', images: [null] }],
    [{ role: 'user', content: 'hi', images: Array.from({ length: 65 }, () => 'aGk=') }],
    [{ role: 'assistant', content: '', tool_calls: 'x' }],
    [{ role: 'assistant', content: '', tool_calls: [{}] }],
    [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 1, arguments: {} } }] }],
    [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 'f', arguments: '{}' } }] }],
    [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 'f', arguments: [] } }] }],
    [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 'f' } }] }],
    [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 'f'.repeat(257), arguments: {} } }] }],
    [{ role: 'user', content: 'hi', thinking: 1 }],
    [{ role: 'tool', content: 'hi', tool_name: 1 }],
    [{ role: 'tool', content: 'hi', tool_name: 't'.repeat(257) }],
    [{ role: 'user', content: 'ok' }, { role: 'user', content: 2 }],
    [{ role: 'user', content: 'ok' }, 'second'],
  ],
  format: ['xml', 'JSON', '', 'json ', 1, 0, true, null, ['json'], [], [{}]],
  options: ['x', '', 1, 0, true, false, null, [], [1], [{ temperature: 0 }]],
  tools: [
    'x',
    {},
    null,
    1,
    true,
    [null],
    [1],
    ['get_weather'],
    [{}],
    [{ type: 'function' }],
    [{ type: 'fn', function: { name: 'f' } }],
    [{ type: 'FUNCTION', function: { name: 'f' } }],
    [{ type: 'function', function: {} }],
    [{ type: 'function', function: { name: '' } }],
    [{ type: 'function', function: { name: 1 } }],
    [{ type: 'function', function: { name: 'f'.repeat(257) } }],
    [{ type: 'function', function: { name: 'f', description: 1 } }],
    [{ type: 'function', function: { name: 'f', parameters: [] } }],
    [{ type: 'function', function: { name: 'f', parameters: 'object' } }],
    [{ type: 'function', function: 'f' }],
    Array.from({ length: 257 }, (_, i) => ({ type: 'function', function: { name: `f${i}` } })),
  ],
  keep_alive: [true, false, null, [], ['5m'], {}, { m: 5 }, 'k'.repeat(33)],
  think: ['extreme', 'LOW', 'High', '', 'true', 1, 0, null, [], {}, ['low']],
  stream: ['true', 'false', '', 1, 0, null, [], {}],
  state_webhook_url: [1, 0, true, null, [], ['http://x/'], {}, { url: 'http://x/' }, ''],
  webhook_events: ['done', null, 1, {}, [], ['bogus'], ['DONE'], ['done', 'done'], [1], [null], ['queued,done'], [...JOB_STATES, 'done']],
  metadata: [
    'x',
    1,
    null,
    true,
    [],
    ['a'],
    { k: 1 },
    { k: null },
    { k: true },
    { k: {} },
    { k: [] },
    { k: ['v'] },
    { '': 'v' },
    { ['k'.repeat(65)]: 'v' },
    { k: 'v'.repeat(1025) },
    Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v'])),
  ],
};

/** state_webhook_url values that are never an acceptable absolute http(s) URL without credentials. */
const BAD_URLS = [
  'file:///etc/passwd',
  'file:host',
  'javascript:alert(1)',
  'data:text/plain,hi',
  'ftp://x',
  'gopher://host/',
  'ws://host/',
  'wss://host/',
  'mailto:a@b.c',
  'about:blank',
  'blob:http://x/',
  'urn:isbn:0451450523',
  'view-source:http://x/',
  'http://user:pw@host/',
  'http://user@host/',
  'http://user:@host/',
  'https://:pw@host/',
  'HTTP://USER:PW@HOST/',
  'http://a b@host/',
  'http://',
  'https://',
  'http:',
  'https:/',
  'http://?',
  'http://#',
  '//host/path',
  '/relative/path',
  'host/path',
  'not a url',
  'http://[::1',
  'https://[::1',
  'http://[::1]x/',
  'http://[:::1]/',
  'http://::1/',
  'http://exa mple.com/',
  'http://%zz/',
  'http://a<b/',
  'http://\u0000x/',
  'http://host:99999/',
  'http://host:-1/',
  'http://host:port/',
  'http://host:80:80/',
  'http://[::1]:65536/',
  'http://256.256.256.256/',
  'http://1.2.3.4.5/',
  'http://[fe80::1%25eth0]/',
  `http://${'a'.repeat(2049)}.example/`,
  `https://example.com/${'p'.repeat(3000)}`,
  `http://example.com/?q=${'q'.repeat(100_000)}`,
];

/** Prototype-pollution shaped bodies (raw JSON text). */
function protoBody(rng: Rng): { label: string; body: string; codes: string[] } {
  const polluted = { polluted: 'yes' };
  const variants: (() => { label: string; body: string; codes: string[] })[] = [
    () => ({ label: 'top-level __proto__', body: JSON.stringify(own(base(), '__proto__', polluted)), codes: ['invalid_json'] }),
    () => ({ label: 'top-level __proto__ first', body: JSON.stringify({ ...own({}, '__proto__', polluted), ...base() }), codes: ['invalid_json'] }),
    () => ({ label: 'escaped \\u005f_proto__', body: `{"\\u005f_proto__":{"polluted":"yes"},"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}`, codes: ['invalid_json'] }),
    () => ({ label: 'top-level constructor.prototype', body: JSON.stringify({ ...base(), constructor: { prototype: polluted } }), codes: ['invalid_json'] }),
    () => ({ label: 'top-level constructor', body: JSON.stringify({ ...base(), constructor: 1 }), codes: ['validation_failed'] }),
    () => ({ label: 'top-level prototype', body: JSON.stringify({ ...base(), prototype: polluted }), codes: ['validation_failed'] }),
    () => ({ label: 'metadata __proto__', body: JSON.stringify({ ...base(), metadata: own({}, '__proto__', 'x') }), codes: ['invalid_json'] }),
    () => ({ label: 'metadata __proto__ object', body: JSON.stringify({ ...base(), metadata: own({ a: 'b' }, '__proto__', polluted) }), codes: ['invalid_json'] }),
    () => ({ label: 'metadata constructor.prototype', body: JSON.stringify({ ...base(), metadata: { constructor: { prototype: 'x' } } }), codes: ['invalid_json'] }),
    () => ({
      label: 'metadata constructor/prototype strings + defect',
      body: JSON.stringify(addDefect(rng, { ...base(), metadata: { constructor: 'x', prototype: 'y', hasOwnProperty: 'z', toString: 'w' } }, ['metadata'])),
      codes: ['validation_failed'],
    }),
    () => ({ label: 'options __proto__', body: JSON.stringify({ ...base(), options: own({}, '__proto__', polluted) }), codes: ['invalid_json'] }),
    () => ({ label: 'options constructor.prototype', body: JSON.stringify({ ...base(), options: { constructor: { prototype: polluted } } }), codes: ['invalid_json'] }),
    () => ({
      label: 'options prototype/constructor + defect',
      body: JSON.stringify(addDefect(rng, { ...base(), options: { prototype: polluted, constructor: 1, __defineGetter__: 1 } })),
      codes: ['validation_failed'],
    }),
    () => ({ label: 'format __proto__', body: JSON.stringify({ ...base(), format: own({ type: 'object' }, '__proto__', polluted) }), codes: ['invalid_json'] }),
    () => ({ label: 'message __proto__', body: JSON.stringify({ model: 'llama3.2', messages: [own({ role: 'user', content: 'hi' }, '__proto__', { role: 'system' })] }), codes: ['invalid_json'] }),
    () => ({
      label: 'tool parameters deep __proto__',
      body: JSON.stringify({ ...base(), tools: [{ type: 'function', function: { name: 'f', parameters: { a: { b: own({}, '__proto__', polluted) } } } }] }),
      codes: ['invalid_json'],
    }),
    () => ({ label: '__proto__ at depth 10000', body: splice({ ...base(), options: PLACEHOLDER }, deepObject(DEPTH, '{"__proto__":{"polluted":"yes"}}')), codes: ['invalid_json'] }),
  ];
  return rng.pick(variants)();
}

/** Malformed JSON text (never parseable). */
function malformedJson(rng: Rng): { label: string; body: string | Buffer; codes: string[] } {
  const valid = JSON.stringify({ ...base(), metadata: { k: 'v' }, options: { temperature: 0.2 } });
  const variants: (() => { label: string; body: string | Buffer })[] = [
    () => {
      const n = rng.int(valid.length);
      return { label: `truncated at ${n}`, body: valid.slice(0, n) };
    },
    () => {
      const junk = rng.pick(['x', '}', ']', ',', '{}', '[]', ' null', '"', '\u0000', ' 1', '{', '\u00e9', ';', 'garbage', '\n{"model":"x"}']);
      return { label: `trailing ${JSON.stringify(junk)}`, body: valid + junk };
    },
    () => ({ label: 'two documents', body: valid + valid }),
    () => {
      const v = rng.pick(['NaN', 'Infinity', '-Infinity', 'undefined', '+1', '01', '0x10', '.5', '1.', '1e', '-', "'x'", 'True', 'NULL', 'nil']);
      return { label: `value ${v}`, body: `{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"keep_alive":${v}}` };
    },
    () => ({ label: 'single quotes', body: valid.replace(/"/g, "'") }),
    () => ({ label: 'unquoted keys', body: '{model:"llama3.2",messages:[{role:"user",content:"hi"}]}' }),
    () => ({ label: 'trailing comma in object', body: '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],}' }),
    () => ({ label: 'trailing comma in array', body: '{"model":"llama3.2","messages":[{"role":"user","content":"hi"},]}' }),
    () => ({ label: 'line comment', body: `// job\n${valid}` }),
    () => ({ label: 'block comment', body: `{"model":"llama3.2",/* c */"messages":[{"role":"user","content":"hi"}]}` }),
    () => ({ label: 'raw newline in string', body: '{"model":"llama\n3.2","messages":[{"role":"user","content":"hi"}]}' }),
    () => ({ label: 'raw tab in string', body: '{"model":"llama\t3.2","messages":[{"role":"user","content":"hi"}]}' }),
    () => ({ label: 'bad escape \\x', body: '{"model":"\\x41","messages":[{"role":"user","content":"hi"}]}' }),
    () => ({ label: 'short \\u escape', body: '{"model":"\\u12","messages":[{"role":"user","content":"hi"}]}' }),
    () => ({ label: 'unterminated string', body: '{"model":"llama3.2,"messages":[]}' }),
    () => ({ label: 'missing colon', body: '{"model" "llama3.2","messages":[]}' }),
    () => ({ label: 'BOM + truncated', body: `\uFEFF${valid.slice(0, rng.int(valid.length))}` }),
    () => ({ label: 'double BOM', body: `\uFEFF\uFEFF${valid}` }),
    () => ({ label: 'BOM bytes + garbage', body: Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(`${valid}x`)]) }),
    () => ({ label: 'UTF-16 BOM', body: Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(valid, 'utf16le')]) }),
    () => ({ label: 'UTF-16LE without BOM', body: Buffer.from(valid, 'utf16le') }),
    () => {
      const bad = rng.pick([[0xff], [0xfe, 0xff], [0xc0, 0xaf], [0x80], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xe2, 0x82]]);
      const at = rng.pick(['{', '{"model":"llama3.2",', '{"model":"llama3.2","messages":[', valid.slice(0, -1)]);
      return { label: `invalid UTF-8 ${Buffer.from(bad).toString('hex')} outside strings`, body: Buffer.concat([Buffer.from(at), Buffer.from(bad), Buffer.from(valid.slice(at.length))]) };
    },
    () => ({ label: 'NUL bytes', body: Buffer.from(`\u0000${valid}`) }),
    () => ({ label: 'whitespace only', body: rng.pick([' ', '\n', '\t\r\n ', '   ']) }),
    () => ({ label: 'empty', body: '' }),
    () => ({ label: 'deep unclosed array', body: '['.repeat(DEPTH) }),
    () => ({ label: 'deep unclosed object', body: '{"a":'.repeat(DEPTH) }),
    () => ({ label: 'deep mismatched', body: '['.repeat(DEPTH) + '}'.repeat(DEPTH) }),
    () => ({ label: 'random bytes', body: Buffer.from(Array.from({ length: rng.range(1, 256) }, () => rng.int(256))).toString('latin1') + '{' }),
    () => ({ label: 'form encoded as json', body: 'model=llama3.2&messages=hi' }),
    () => ({ label: 'xml as json', body: '<job><model>llama3.2</model></job>' }),
  ];
  const v = rng.pick(variants)();
  return { ...v, codes: ['invalid_json'] };
}

/** A body that is valid JSON but not a valid job. */
function schemaInvalid(rng: Rng): { label: string; body: string | Buffer; codes: string[] } {
  const r = rng.float();
  if (r < 0.55) {
    // One or more wrong-typed fields.
    const o = base();
    const fields = Object.keys(BAD);
    const n = rng.range(1, 3);
    const touched: string[] = [];
    for (let i = 0; i < n; i++) {
      const f = rng.pick(fields);
      o[f] = structuredClone(rng.pick(BAD[f]!));
      touched.push(f);
    }
    // webhook_events is only meaningful with a URL; give it a valid one half of the time.
    if (touched.includes('webhook_events') && !touched.includes('state_webhook_url') && rng.chance(0.5)) o.state_webhook_url = VALID_HOOK;
    return { label: `wrong types: ${touched.join(',')}`, body: JSON.stringify(o), codes: ['validation_failed'] };
  }
  if (r < 0.65) {
    const o = base();
    const url = rng.pick(BAD_URLS);
    o.state_webhook_url = url;
    if (rng.chance(0.3)) o.webhook_events = ['done'];
    return { label: `webhook url ${JSON.stringify(url.slice(0, 40))}`, body: JSON.stringify(o), codes: ['validation_failed'] };
  }
  if (r < 0.7) {
    return { label: 'webhook_events without url', body: JSON.stringify({ ...base(), webhook_events: [rng.pick(JOB_STATES)] }), codes: ['validation_failed'] };
  }
  if (r < 0.8) {
    // Missing fields.
    const variants: [string, unknown][] = [
      ['{}', {}],
      ['model only', { model: 'llama3.2' }],
      ['messages only', { messages: user() }],
      ['optional fields only', { stream: true, options: {}, metadata: { a: 'b' } }],
      ['message without role', { model: 'llama3.2', messages: [{ content: 'hi' }] }],
      ['message without content', { model: 'llama3.2', messages: [{ role: 'user' }] }],
      ['empty message', { model: 'llama3.2', messages: [{}] }],
      ['tool without function', { ...base(), tools: [{ type: 'function' }] }],
      ['tool without type', { ...base(), tools: [{ function: { name: 'f' } }] }],
      ['tool_call without arguments', { model: 'llama3.2', messages: [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 'f' } }] }] }],
    ];
    const [label, body] = rng.pick(variants);
    return { label: `missing: ${label}`, body: JSON.stringify(body), codes: ['validation_failed'] };
  }
  if (r < 0.88) {
    // Unknown or misspelt fields, JSON values that are not objects, duplicate keys (last wins).
    const variants: [string, string][] = [
      ['unknown field', JSON.stringify({ ...base(), prompt: 'hi' })],
      ['misspelt Model', JSON.stringify({ ...base(), Model: 'x' })],
      ['key with trailing space', JSON.stringify({ ...base(), 'model ': 'x' })],
      ['empty key', JSON.stringify({ ...base(), '': 1 })],
      ['unicode key', JSON.stringify({ ...base(), mødel: 'x' })],
      ['null body', 'null'],
      ['true body', 'true'],
      ['number body', '42'],
      ['string body', '"llama3.2"'],
      ['array body', JSON.stringify([base()])],
      ['empty array body', '[]'],
      ['duplicate model, last invalid', '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"model":7}'],
      ['duplicate messages, last empty', '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"messages":[]}'],
    ];
    const [label, body] = rng.pick(variants);
    return { label, body, codes: ['validation_failed'] };
  }
  if (r < 0.95) {
    // Deep nesting, alone or inside a field (with a defect where the field alone would be valid).
    const variants: (() => { label: string; body: string })[] = [
      () => ({ label: 'whole body deep array', body: deepArray(DEPTH) }),
      () => ({ label: 'whole body deep object', body: deepObject(DEPTH) }),
      () => ({ label: 'whole body deep mixed', body: deepMixed(DEPTH) }),
      () => ({ label: 'deep options + defect', body: splice(addDefect(rng, { ...base(), options: PLACEHOLDER }, []), deepObject(DEPTH)) }),
      () => ({ label: 'deep options (array) + defect', body: splice(addDefect(rng, { ...base(), options: { x: PLACEHOLDER } }), deepArray(DEPTH)) }),
      () => ({ label: 'deep format + defect', body: splice(addDefect(rng, { ...base(), format: PLACEHOLDER }), deepMixed(DEPTH)) }),
      () => ({ label: 'deep metadata', body: splice({ ...base(), metadata: PLACEHOLDER }, deepObject(DEPTH, '"v"')) }),
      () => ({ label: 'deep metadata value', body: splice({ ...base(), metadata: { k: PLACEHOLDER } }, deepArray(DEPTH)) }),
      () => ({ label: 'deep messages', body: splice({ model: 'llama3.2', messages: PLACEHOLDER }, deepArray(DEPTH)) }),
      () => ({ label: 'deep message content', body: splice({ model: 'llama3.2', messages: [{ role: 'user', content: PLACEHOLDER }] }, deepObject(DEPTH)) }),
      () => ({ label: 'deep tool parameters + defect', body: splice(addDefect(rng, { ...base(), tools: [{ type: 'function', function: { name: 'f', parameters: { p: PLACEHOLDER } } }] }), deepObject(DEPTH)) }),
      () => ({ label: 'deep model', body: splice({ model: PLACEHOLDER, messages: user() }, deepArray(DEPTH)) }),
    ];
    return { ...rng.pick(variants)(), codes: ['validation_failed'] };
  }
  // Invalid UTF-8 inside strings decodes to U+FFFD, which is valid JSON: add a defect.
  const o = addDefect(rng, { ...base(), metadata: { k: PLACEHOLDER } }, ['metadata']);
  const text = JSON.stringify(o);
  const [before, after] = text.split(PLACEHOLDER) as [string, string];
  const bad = Buffer.from(rng.pick([[0xff], [0xc3], [0xed, 0xa0, 0x80], [0xc0, 0x80]]));
  return { label: 'invalid UTF-8 in a string + defect', body: Buffer.concat([Buffer.from(before), bad, Buffer.from(after)]), codes: ['validation_failed'] };
}

// Huge bodies: built once, sent a few times each (all under the default 10 MB body limit).
const HUGE: { label: string; body: () => string }[] = [
  { label: '1 MB model name', body: () => JSON.stringify({ model: 'm'.repeat(1 << 20), messages: user() }) },
  { label: '1 MB webhook url', body: () => JSON.stringify({ ...base(), state_webhook_url: `http://example.com/${'a'.repeat(1 << 20)}` }) },
  { label: '1 MB metadata value', body: () => JSON.stringify({ ...base(), metadata: { k: 'v'.repeat(1 << 20) } }) },
  { label: '1 MB keep_alive', body: () => JSON.stringify({ ...base(), keep_alive: 'k'.repeat(1 << 20) }) },
  { label: '100k messages', body: () => JSON.stringify({ model: 'llama3.2', messages: Array.from({ length: 100_000 }, () => ({ role: 'user', content: '' })) }) },
  { label: '100k images', body: () => JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'hi', images: Array.from({ length: 100_000 }, () => 'x') }] }) },
  { label: '100k tools', body: () => JSON.stringify({ ...base(), tools: Array.from({ length: 100_000 }, () => ({ type: 'function', function: { name: 'f' } })) }) },
  { label: '100k metadata keys', body: () => JSON.stringify({ ...base(), metadata: Object.fromEntries(Array.from({ length: 100_000 }, (_, i) => [`k${i}`, 'v'])) }) },
  { label: '100k webhook_events', body: () => JSON.stringify({ ...base(), state_webhook_url: VALID_HOOK, webhook_events: Array.from({ length: 100_000 }, () => 'done') }) },
];
const hugeCache = new Map<string, string>();
const huge = (i: number) => {
  const h = HUGE[i]!;
  let b = hugeCache.get(h.label);
  if (b === undefined) hugeCache.set(h.label, (b = h.body()));
  return { label: h.label, body: b };
};

// Path pieces for ids and artifact names (already in wire form: percent-encoded or raw-but-legal).
const HOSTILE_SEGMENTS = [
  '..',
  '.',
  '...',
  '..%2F',
  '..%2f..%2f..%2fetc%2fpasswd',
  '%2e%2e',
  '%2E%2E',
  '%2e%2e%2f',
  '%2e%2e%5c',
  '%252e%252e%252f',
  '%2F',
  'a%2Fb',
  '%2Fetc%2Fpasswd',
  '%00',
  'a%00',
  '%00..%2F',
  'completion%00.txt',
  '\\',
  '..\\..\\windows',
  '%5C',
  '%5c..%5c',
  'C:%5Cboot.ini',
  '%C3%A9',
  '%F0%9F%92%A9',
  '%E2%80%AE',
  '%EF%BB%BF',
  '%E2%80%A8',
  '%20',
  '%09',
  '%0D%0AX-Injected:%201',
  '%22%3E%3Cscript%3E',
  "'%20OR%201=1%20--",
  '%7B%7D',
  'null',
  'undefined',
  'NaN',
  '-1',
  '0',
  '1e999',
  'COMPLETION',
  'a;b',
  'a,b',
  '~',
  '@',
  '$',
  '*',
];
/** Malformed percent-encoding: 400 invalid_url. */
const BAD_ENCODINGS = ['%', '%%', '%zz', '%2', '%u0041', '%FF', '%C3', '%E0%A4%A', '..%c0%af', '%ED%A0%80', '%C0%AE%C0%AE'];

function randomUuidLike(rng: Rng): string {
  const hex = () => rng.text(1, '0123456789abcdef');
  let s = '';
  for (const n of [8, 4, 4, 4, 12]) s += (s ? '-' : '') + Array.from({ length: n }, hex).join('');
  return s;
}

/** An id or name segment: hostile, random, long (10 KB), or with bad encoding. */
function segment(rng: Rng): { seg: string; badEncoding: boolean; long: boolean } {
  const r = rng.float();
  if (r < 0.4) return { seg: rng.pick(HOSTILE_SEGMENTS), badEncoding: false, long: false };
  if (r < 0.55) return { seg: randomUuidLike(rng), badEncoding: false, long: false };
  if (r < 0.65) return { seg: rng.pick(BAD_ENCODINGS), badEncoding: true, long: false };
  if (r < 0.72) return { seg: rng.text(10_240), badEncoding: false, long: true };
  if (r < 0.78) {
    // ~10 KB on the wire of encoded unicode text (stays under Node's 16 KB header limit).
    const text = rng.text(1_100, 'aé☃😀/\\.%\u0000 ');
    return { seg: encodeURIComponent(text), badEncoding: false, long: true };
  }
  if (r < 0.9) {
    const text = rng.text(rng.range(1, 40), 'abc./\\%~:@!$&\'()*+,;= \u0000\u00e9\u4e2d😀\n');
    return { seg: encodeURIComponent(text), badEncoding: false, long: false };
  }
  return { seg: rng.pick(HOSTILE_SEGMENTS) + rng.pick(HOSTILE_SEGMENTS), badEncoding: false, long: false };
}

/** Statuses for a GET/POST on a job path with an unknown id: 404, or 400 for bad percent-encoding. */
function idStatuses(...parts: { badEncoding: boolean; long: boolean }[]): { status: number[]; codes: string[] } {
  if (parts.some((p) => p.badEncoding)) return { status: [400, 404], codes: ['invalid_url', 'not_found', 'job_not_found', 'route_not_found'] };
  return { status: [404], codes: ['job_not_found', 'not_found', 'route_not_found'] };
}

function genSubmit(rng: Rng): Case {
  const r = rng.float();
  const post = (label: string, body: string | Buffer, ct: string | undefined, status: number[], codes: string[]): Case => ({
    kind: 'submit',
    label,
    method: 'POST',
    path: rng.chance(0.1) ? `/jobs?${rng.pick(['x=1', 'model=llama3.2', '__proto__[x]=1', 'a=%zz'])}` : '/jobs',
    headers: ct === undefined ? {} : { 'content-type': ct },
    body,
    chunked: rng.chance(0.15),
    status,
    codes,
  });
  if (r < 0.3) {
    const m = malformedJson(rng);
    return post(`malformed JSON: ${m.label}`, m.body, rng.pick(JSON_TYPES), [400], m.codes);
  }
  if (r < 0.75) {
    const s = schemaInvalid(rng);
    return post(`invalid body: ${s.label}`, s.body, rng.pick(JSON_TYPES), [400], s.codes);
  }
  if (r < 0.85) {
    const p = protoBody(rng);
    return post(`prototype keys: ${p.label}`, p.body, rng.pick(JSON_TYPES), [400], p.codes);
  }
  // Wrong content type (even with a valid job body): 415.
  const valid = JSON.stringify(base());
  const variants: (() => Case)[] = [
    () => {
      const ct = rng.pick(NON_JSON_TYPES);
      return post(`content-type ${ct}`, valid, ct, [415], ['unsupported_media_type']);
    },
    () => post('form body', 'model=llama3.2&messages[0][role]=user&messages[0][content]=hi', 'application/x-www-form-urlencoded', [415], ['unsupported_media_type']),
    () =>
      post(
        'multipart body',
        `------fuzz\r\nContent-Disposition: form-data; name="job"\r\nContent-Type: application/json\r\n\r\n${valid}\r\n------fuzz--\r\n`,
        'multipart/form-data; boundary=----fuzz',
        [415],
        ['unsupported_media_type'],
      ),
    () => post('xml body', '<?xml version="1.0"?><job><model>llama3.2</model></job>', 'application/xml', [415], ['unsupported_media_type']),
    () => post('no content-type with a body', Buffer.from(valid), undefined, [415], ['unsupported_media_type']),
    () => {
      const ct = rng.pick(NON_JSON_TYPES);
      const m = malformedJson(rng);
      return post(`content-type ${ct} + malformed`, m.body.length ? m.body : 'x', ct, [415], ['unsupported_media_type']);
    },
  ];
  return rng.pick(variants)();
}

function genGet(rng: Rng): Case {
  const id = segment(rng);
  const q = rng.chance(0.1) ? `?${rng.pick(['x=1', 'state=done', 'id=../../x', '__proto__=1'])}` : '';
  return { kind: 'get', label: `GET id ${id.seg.slice(0, 60)}`, method: 'GET', path: `/jobs/${id.seg}${q}`, ...idStatuses(id) };
}

function genArtifact(rng: Rng): Case {
  const id = rng.chance(0.5) ? { seg: randomUuidLike(rng), badEncoding: false, long: false } : segment(rng);
  let name = rng.chance(0.2) ? { seg: rng.pick(['completion', 'result.json', 'thinking']), badEncoding: false, long: false } : segment(rng);
  // Two 10 KB segments would pass Node's 16 KB header limit (431, covered separately below).
  if (id.long && name.long) name = { seg: rng.pick(HOSTILE_SEGMENTS), badEncoding: false, long: false };
  const headers = rng.chance(0.1) ? { 'if-none-match': rng.pick(['*', `"${'0'.repeat(64)}"`, 'W/"x", "y"', '']) } : undefined;
  return {
    kind: 'artifact',
    label: `GET artifact ${id.seg.slice(0, 40)} / ${name.seg.slice(0, 40)}`,
    method: 'GET',
    path: `/jobs/${id.seg}/artifacts/${name.seg}`,
    ...(headers ? { headers } : {}),
    ...idStatuses(id, name),
  };
}

function genRedeliver(rng: Rng): Case {
  const id = rng.chance(0.4) ? { seg: randomUuidLike(rng), badEncoding: false, long: false } : segment(rng);
  const path = `/jobs/${id.seg}/webhooks/redeliver`;
  const st = idStatuses(id);
  const r = rng.float();
  if (r < 0.3) {
    const q = rng.pick(['state=bogus', 'state=DONE', 'state=', 'state=done&state=failed', 'state=done&x=1', 'foo=bar', 'state[]=done', '__proto__=x', 'constructor=x']);
    // A bad query (or an unknown id) — either way a 4xx.
    return { kind: 'redeliver', label: `redeliver ${id.seg.slice(0, 40)} ?${q}`, method: 'POST', path: `${path}?${q}`, status: [400, 404], codes: [...st.codes, 'validation_failed'] };
  }
  if (r < 0.45) {
    const ct = rng.pick(NON_JSON_TYPES);
    return { kind: 'redeliver', label: `redeliver ${id.seg.slice(0, 40)} ct ${ct}`, method: 'POST', path, headers: { 'content-type': ct }, body: 'state=done', status: [400, 404, 415], codes: [...st.codes, 'unsupported_media_type'] };
  }
  if (r < 0.6) {
    const m = malformedJson(rng);
    return { kind: 'redeliver', label: `redeliver ${id.seg.slice(0, 40)} malformed ${m.label}`, method: 'POST', path, headers: { 'content-type': JSON_CT }, body: m.body, status: [400, 404], codes: [...st.codes, 'invalid_json'] };
  }
  if (r < 0.7) {
    const p = protoBody(rng);
    return { kind: 'redeliver', label: `redeliver ${id.seg.slice(0, 40)} proto ${p.label}`, method: 'POST', path, headers: { 'content-type': JSON_CT }, body: p.body, status: [400, 404], codes: [...st.codes, 'invalid_json'] };
  }
  return { kind: 'redeliver', label: `redeliver ${id.seg.slice(0, 60)}`, method: 'POST', path, ...st };
}

function genUnknown(rng: Rng): Case {
  const id = randomUuidLike(rng);
  const r = rng.float();
  let method: string;
  let path: string;
  if (r < 0.4) {
    method = rng.pick(['PUT', 'DELETE', 'PATCH', 'OPTIONS', 'PROPFIND', 'TRACE', 'SEARCH']);
    path = rng.pick(['/jobs', `/jobs/${id}`, `/jobs/${id}/artifacts/completion`, `/jobs/${id}/webhooks/redeliver`, '/healthz', '/readyz', '/']);
  } else if (r < 0.7) {
    [method, path] = rng.pick([
      ['GET', `/jobs/${id}/events/more`],
      ['GET', `/jobs/${id}/artifacts`],
      ['GET', `/jobs/${id}/webhooks`],
      ['GET', `/jobs/${id}/webhooks/redeliver`],
      ['POST', `/jobs/${id}`],
      ['POST', `/jobs/${id}/webhooks`],
      ['POST', `/jobs/${id}/artifacts/completion`],
      ['POST', '/healthz'],
      ['POST', '/readyz'],
      ['POST', '/jobs/'],
      ['GET', '/JOBS/x'],
      ['GET', '/HEALTHZ'],
      ['GET', '/healthz/'],
      ['GET', '//healthz'],
      ['GET', '/./healthz'],
      ['GET', '/jobs/../healthz'],
      ['GET', '/api/chat'],
      ['POST', '/api/generate'],
      ['GET', '/.env'],
      ['GET', '/../../etc/passwd'],
      ['GET', '/%2e%2e/%2e%2e/etc/passwd'],
      ['GET', '/admin'],
      ['GET', '/favicon.ico'],
      ['GET', `/jobs/${id}/artifacts/completion/extra`],
      ['POST', `/jobs/${id}/webhooks/redeliver/now`],
    ] as [string, string][]);
  } else {
    method = rng.pick(['GET', 'POST', 'PUT', 'DELETE']);
    const segs = Array.from({ length: rng.range(1, 5) }, () => rng.pick([rng.text(rng.range(1, 12)), ...HOSTILE_SEGMENTS.slice(0, 20)]));
    // The first segment is never a registered one.
    path = `/x${rng.text(3)}/${segs.join('/')}`;
  }
  const bad = BAD_ENCODINGS.some((b) => path.includes(b));
  const c: Case = { kind: 'unknown', label: `${method} ${path.slice(0, 80)}`, method, path, status: bad ? [400, 404] : [404], codes: ['route_not_found', 'invalid_url'] };
  if (method !== 'GET' && rng.chance(0.3)) {
    c.headers = { 'content-type': JSON_CT };
    c.body = JSON.stringify(base());
  }
  return c;
}

function generate(rng: Rng, count: number): Case[] {
  const cases: Case[] = [];
  // Fixed coverage first, so every listed hostile value is sent whatever the seed.
  for (let i = 0; i < HUGE.length; i++) {
    for (let k = 0; k < 2; k++) {
      const h = huge(i);
      cases.push({ kind: 'submit', label: `huge: ${h.label}`, method: 'POST', path: '/jobs', headers: { 'content-type': JSON_CT }, body: h.body, status: [400], codes: ['validation_failed'] });
    }
  }
  // Over FOREMAN_MAX_BODY_BYTES (10 MB by default): 413, with a Content-Length and chunked.
  const overLimit = JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'x'.repeat(11 << 20) }] });
  for (const chunked of [false, true]) {
    cases.push({ kind: 'submit', label: `over the body limit${chunked ? ' (chunked)' : ''}`, method: 'POST', path: '/jobs', headers: { 'content-type': JSON_CT }, body: overLimit, chunked, status: [413], codes: ['payload_too_large'] });
  }
  for (const url of BAD_URLS) {
    cases.push({ kind: 'submit', label: `webhook url ${JSON.stringify(url.slice(0, 40))}`, method: 'POST', path: '/jobs', headers: { 'content-type': JSON_CT }, body: JSON.stringify({ ...base(), state_webhook_url: url }), status: [400], codes: ['validation_failed'] });
  }
  for (const [field, values] of Object.entries(BAD)) {
    for (const v of values) {
      const o = { ...base(), [field]: v };
      if (field === 'webhook_events') o.state_webhook_url = VALID_HOOK;
      cases.push({ kind: 'submit', label: `wrong type ${field}=${JSON.stringify(v).slice(0, 40)}`, method: 'POST', path: '/jobs', headers: { 'content-type': JSON_CT }, body: JSON.stringify(o), status: [400], codes: ['validation_failed'] });
    }
  }
  for (const ct of NON_JSON_TYPES) {
    cases.push({ kind: 'submit', label: `content-type ${ct}`, method: 'POST', path: '/jobs', headers: { 'content-type': ct }, body: JSON.stringify(base()), status: [415], codes: ['unsupported_media_type'] });
  }
  for (const seg of [...HOSTILE_SEGMENTS, ...BAD_ENCODINGS, 'a'.repeat(10_240)]) {
    const s = { seg, badEncoding: BAD_ENCODINGS.includes(seg), long: seg.length > 256 };
    cases.push({ kind: 'get', label: `GET id ${seg.slice(0, 60)}`, method: 'GET', path: `/jobs/${seg}`, ...idStatuses(s) });
    cases.push({ kind: 'artifact', label: `GET artifact name ${seg.slice(0, 60)}`, method: 'GET', path: `/jobs/${randomUuidLike(rng)}/artifacts/${seg}`, ...idStatuses(s) });
    cases.push({ kind: 'artifact', label: `GET artifact id ${seg.slice(0, 60)}`, method: 'GET', path: `/jobs/${seg}/artifacts/completion`, ...idStatuses(s) });
    cases.push({ kind: 'redeliver', label: `redeliver ${seg.slice(0, 60)}`, method: 'POST', path: `/jobs/${seg}/webhooks/redeliver`, ...idStatuses(s) });
  }
  // Then random cases, spread over the endpoints.
  const gens: [number, (rng: Rng) => Case][] = [
    [0.55, genSubmit],
    [0.13, genGet],
    [0.12, genArtifact],
    [0.11, genRedeliver],
    [0.09, genUnknown],
  ];
  while (cases.length < count) {
    let x = rng.float();
    for (const [w, g] of gens) {
      if ((x -= w) < 0 || g === genUnknown) {
        cases.push(g(rng));
        break;
      }
    }
  }
  return cases;
}

// ---------------------------------------------------------------------------
// Sending and checking

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  raw: Buffer;
}

/** The body in random 1..4096-byte pieces (sent with Transfer-Encoding: chunked). */
function* chunks(body: Buffer, rng: Rng): Generator<Buffer> {
  let i = 0;
  while (i < body.length) {
    const n = Math.min(body.length - i, rng.range(1, 4096));
    yield body.subarray(i, i + n);
    i += n;
  }
}

async function send(pool: Pool, c: Case, rng: Rng): Promise<Answer> {
  const body = c.body === undefined ? undefined : c.chunked ? Readable.from(chunks(Buffer.from(c.body), rng)) : c.body;
  const res = await pool.request({ method: c.method as 'GET', path: c.path, headers: c.headers ?? {}, body });
  const raw = Buffer.from(await res.body.arrayBuffer());
  return { status: res.statusCode, headers: res.headers as Answer['headers'], raw };
}

/** Returns the problems with one answer (empty when it is a proper API error). */
function problems(c: Case, a: Answer): string[] {
  const out: string[] = [];
  if (a.status < 400 || a.status > 499) out.push(`status ${a.status} is not 4xx`);
  else if (!c.status.includes(a.status)) out.push(`status ${a.status}, expected ${c.status.join('|')}`);
  if (a.headers['x-content-type-options'] !== 'nosniff') out.push(`x-content-type-options is ${JSON.stringify(a.headers['x-content-type-options'])}`);
  if (a.headers['x-powered-by'] !== undefined) out.push('has x-powered-by');
  let body: any;
  try {
    body = JSON.parse(a.raw.toString('utf8'));
  } catch {
    out.push(`body is not JSON: ${JSON.stringify(a.raw.toString('utf8').slice(0, 120))}`);
    return out;
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    out.push(`body is not an object: ${JSON.stringify(body).slice(0, 120)}`);
    return out;
  }
  if (typeof body.code !== 'string') out.push(`code is ${JSON.stringify(body.code)}`);
  else if (c.codes && !c.codes.includes(body.code)) out.push(`code ${body.code}, expected ${c.codes.join('|')}`);
  if (typeof body.message !== 'string') out.push(`message is ${JSON.stringify(body.message)}`);
  if ('stack' in body) out.push('body has a stack');
  const extra = Object.keys(body).filter((k) => !['code', 'message', 'field'].includes(k));
  if (extra.length) out.push(`unexpected keys ${extra.join(',')}`);
  if ('field' in body && typeof body.field !== 'string') out.push('field is not a string');
  if (/\n\s+at |\.(ts|js):\d+/.test(String(body.message))) out.push(`message looks like a stack trace: ${String(body.message).slice(0, 120)}`);
  if (out.length) out.push(`body ${JSON.stringify(body).slice(0, 200)}`);
  return out;
}


// ---------------------------------------------------------------------------

describe(`hostile input fuzz (seed ${SEED})`, () => {
  let h: Harness;
  let pool: Pool;
  const crashes: unknown[] = [];
  const onCrash = (err: unknown) => void crashes.push(err);

  beforeAll(async () => {
    h = await startHarness();
    pool = new Pool(h.url, { connections: BATCH });
    process.on('uncaughtException', onCrash);
    process.on('unhandledRejection', onCrash);
  });
  afterAll(async () => {
    process.off('uncaughtException', onCrash);
    process.off('unhandledRejection', onCrash);
    await pool?.close();
    await h?.stop();
  });

  it(`answers ${COUNT}+ definitely-invalid requests with 4xx API errors and writes nothing`, async () => {
    const rng = new Rng(SEED);
    const cases = generate(rng, COUNT);
    const tag = `[FOREMAN_FUZZ_SEED=${SEED}]`;

    const byKind: Record<Kind, number> = { submit: 0, get: 0, artifact: 0, redeliver: 0, unknown: 0 };
    for (const c of cases) byKind[c.kind]++;
    expect(cases.length, tag).toBeGreaterThanOrEqual(2_000);
    for (const k of Object.keys(byKind) as Kind[]) expect(byKind[k], `${tag} ${k} requests`).toBeGreaterThanOrEqual(100);

    const failures: string[] = [];
    const seen = new Map<string, number>();
    for (let i = 0; i < cases.length; i += BATCH) {
      const batch = cases.slice(i, i + BATCH);
      await Promise.all(
        batch.map(async (c, j) => {
          const n = i + j;
          const where = `#${n} ${c.label} (${c.method} ${c.path.slice(0, 100)}${c.path.length > 100 ? '…' : ''})`;
          try {
            const a = await send(pool, c, new Rng(SEED ^ n));
            const p = problems(c, a);
            let code = '?';
            try {
              code = String(JSON.parse(a.raw.toString('utf8')).code);
            } catch {
              // reported by problems()
            }
            const key = `${a.status} ${code}`;
            seen.set(key, (seen.get(key) ?? 0) + 1);
            if (p.length) failures.push(`${where}: ${p.join('; ')}`);
          } catch (err) {
            failures.push(`${where}: request failed: ${(err as Error).message}`);
          }
        }),
      );
    }

    const summary = `${tag} ${failures.length} of ${cases.length} requests failed ${JSON.stringify(byKind)}`;
    expect(failures.slice(0, 40), summary).toEqual([]);

    // The run exercised every kind of rejection (the generators are not all hitting one check).
    const kinds = [...seen.keys()].sort();
    for (const k of ['400 invalid_json', '400 validation_failed', '400 invalid_url', '404 job_not_found', '404 not_found', '404 route_not_found', '413 payload_too_large', '415 unsupported_media_type']) {
      expect(kinds, `${tag} answers seen`).toContain(k);
    }

    expect((await jobCount(h)), `${tag} job rows written`).toBe(0);
    expect(({} as Record<string, unknown>).polluted, `${tag} Object.prototype polluted`).toBeUndefined();
    expect(crashes.map(String), `${tag} uncaught errors`).toEqual([]);
    expect(h.service.app.server.listening, `${tag} server still listening`).toBe(true);

    // Measured on the already-open client pool, so only the server's responsiveness is timed.
    const t0 = performance.now();
    const health = await pool.request({ method: 'GET', path: '/healthz' });
    const healthBody = await health.body.json();
    const ms = performance.now() - t0;
    expect(health.statusCode, tag).toBe(200);
    expect(healthBody, tag).toEqual({ status: 'ok' });
    expect(ms, `${tag} GET /healthz took ${ms.toFixed(1)} ms`).toBeLessThan(100);

    // Control: the same service accepts a valid job, so the rejections above came from the defects.
    const ok = await h.api('/jobs', { method: 'POST', json: base() });
    expect(ok.status, `${tag} ${JSON.stringify(ok.body)}`).toBe(202);
    expect((await jobCount(h)), tag).toBe(1);
  });
});

// ---------------------------------------------------------------------------
// Deep nesting where the schema allows any JSON (options, format, tool parameters/arguments)

describe('syntactically valid jobs nested 10,000 levels deep', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await h.stop();
  });

  const deepJobs: [string, string][] = [
    ['options', splice({ ...base(), options: PLACEHOLDER }, deepObject(DEPTH))],
    ['options (arrays)', splice({ ...base(), options: { stop: PLACEHOLDER } }, deepArray(DEPTH))],
    ['format', splice({ ...base(), format: PLACEHOLDER }, deepObject(DEPTH))],
    ['tools[0].function.parameters', splice({ ...base(), tools: [{ type: 'function', function: { name: 'f', parameters: { p: PLACEHOLDER } } }] }, deepObject(DEPTH))],
    [
      'messages[0].tool_calls[0].function.arguments',
      splice({ model: 'llama3.2', messages: [{ role: 'assistant', content: '', tool_calls: [{ function: { name: 'f', arguments: { a: PLACEHOLDER } } }] }] }, deepArray(DEPTH)),
    ],
  ];

  for (const [where, body] of deepJobs) {
    it(`in ${where}: a 4xx API error (or accepted and run), never a 5xx`, async () => {
      const before = (await jobCount(h));
      const r = await h.api('/jobs', { method: 'POST', headers: { 'content-type': JSON_CT }, body });
      expect(r.status, `${where}: ${JSON.stringify(r.body)}`).toBeLessThan(500);
      if (r.status === 202) {
        expect((await jobCount(h))).toBe(before + 1);
        const job = await h.waitForState(r.body.job_id, ['done', 'failed']);
        expect(['done', 'failed']).toContain(job.state);
      } else {
        expect(r.status).toBeGreaterThanOrEqual(400);
        expect(typeof r.body.code).toBe('string');
        expect(typeof r.body.message).toBe('string');
        expect(r.body.stack).toBeUndefined();
        expect(r.headers.get('x-content-type-options')).toBe('nosniff');
        expect((await jobCount(h))).toBe(before);
      }
    });
  }

  it('does not fail valid jobs submitted in the same event-loop turn (one group commit)', async () => {
    const valid = JSON.stringify(base());
    const deep = deepJobs[0]![1];
    const hurt: string[] = [];
    const deepStatuses: number[] = [];
    for (let round = 0; round < 5; round++) {
      const before = (await jobCount(h));
      const answers = await Promise.all(
        Array.from({ length: 40 }, (_, i) => h.api('/jobs', { method: 'POST', headers: { 'content-type': JSON_CT }, body: i === 20 ? deep : valid })),
      );
      answers.forEach((a, i) => {
        if (i !== 20 && a.status !== 202) hurt.push(`round ${round} #${i}: ${a.status} ${JSON.stringify(a.body)}`);
      });
      deepStatuses.push(answers[20]!.status);
      expect((await jobCount(h))).toBe(before + answers.filter((a) => a.status === 202).length);
    }
    expect(hurt, `valid jobs that failed next to the deep one (deep one got ${deepStatuses.join(',')})`).toEqual([]);
    expect(Math.max(...deepStatuses)).toBeLessThan(500);
  });
});

// ---------------------------------------------------------------------------
// Bodies that never finish arriving

interface RawAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
  /** The server closed the connection (we never end our side). */
  closedByServer: boolean;
  elapsedMs: number;
}

/** Writes `head` (and optional first `chunk`) on a raw socket, never ends, and collects the answer. */
function rawRequest(url: string, head: string, chunk: string | undefined, timeoutMs: number): Promise<RawAnswer> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const sock = net.connect({ host: hostname, port: Number(port) });
    const data: Buffer[] = [];
    let closedByServer = false;
    const timer = setTimeout(() => {
      sock.destroy();
      finish();
    }, timeoutMs);
    const finish = () => {
      clearTimeout(timer);
      const text = Buffer.concat(data).toString('utf8');
      const [headText = '', ...rest] = text.split('\r\n\r\n');
      const [statusLine = '', ...lines] = headText.split('\r\n');
      const headers: Record<string, string> = {};
      for (const l of lines) {
        const i = l.indexOf(':');
        if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
      }
      resolve({ status: Number(statusLine.split(' ')[1] ?? 0), headers, body: rest.join('\r\n\r\n'), closedByServer, elapsedMs: performance.now() - t0 });
    };
    sock.on('data', (d) => data.push(d));
    sock.on('end', () => {
      closedByServer = true;
    });
    sock.on('close', () => finish());
    sock.on('error', (err) => {
      if ((err as NodeJS.ErrnoException).code === 'ECONNRESET') closedByServer = true;
      else reject(err);
    });
    sock.on('connect', () => {
      sock.write(head);
      if (chunk !== undefined) sock.write(chunk);
    });
  });
}

describe('request bodies that never complete', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ bodyTimeoutMs: 300 });
  });
  afterAll(async () => {
    await h.stop();
  });

  function expect408(a: RawAnswer, what: string): void {
    expect(a.status, `${what}: ${JSON.stringify(a)}`).toBe(408);
    const body = JSON.parse(a.body);
    expect(body.code, what).toBe('body_timeout');
    expect(typeof body.message, what).toBe('string');
    expect(body.stack, what).toBeUndefined();
    expect(a.headers['x-content-type-options'], what).toBe('nosniff');
    expect(a.headers['x-powered-by'], what).toBeUndefined();
    expect(a.headers['content-type'], what).toMatch(/^application\/json/);
    expect(a.closedByServer, `${what}: server closed the connection`).toBe(true);
    // Answered after the 300 ms body timeout, and well before our own 5 s give-up.
    expect(a.elapsedMs, what).toBeGreaterThanOrEqual(250);
    expect(a.elapsedMs, what).toBeLessThan(4_000);
  }

  it('a chunked POST /jobs body that never ends gets 408 body_timeout and the connection is closed', async () => {
    const head =
      'POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n';
    const part = '{"model":';
    const a = await rawRequest(h.url, head, `${part.length.toString(16)}\r\n${part}\r\n`, 5_000);
    expect408(a, 'chunked');
    expect((await jobCount(h))).toBe(0);
  });

  it('a Content-Length larger than the bytes sent gets 408 body_timeout and the connection is closed', async () => {
    const part = '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]';
    const head = `POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${part.length + 1000}\r\n\r\n`;
    const a = await rawRequest(h.url, head, part, 5_000);
    expect408(a, 'content-length');
    expect((await jobCount(h))).toBe(0);
  });

  it('a chunked body with headers only (no chunk at all) gets 408 too', async () => {
    const head = 'POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n';
    const a = await rawRequest(h.url, head, undefined, 5_000);
    expect408(a, 'headers only');
    expect((await jobCount(h))).toBe(0);
  });

  it('stays healthy after stalled bodies, and a complete body still works on a new connection', async () => {
    const stalled = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        rawRequest(
          h.url,
          `POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n`,
          `{"model":"m${i}"`,
          5_000,
        ),
      ),
    );
    for (const [i, a] of stalled.entries()) expect408(a, `stalled #${i}`);
    expect((await jobCount(h))).toBe(0);
    const t0 = performance.now();
    const r = await h.api('/healthz');
    expect(r.status).toBe(200);
    expect(performance.now() - t0).toBeLessThan(100);
  });
});

// ---------------------------------------------------------------------------
// Requests rejected by Node's HTTP parser, before Fastify sees them

describe('requests the HTTP parser rejects', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await h.stop();
  });

  /** README: "Every error is JSON {code, message, field?}"; also with the security headers. */
  function expectApiError(a: RawAnswer, what: string): void {
    expect(a.status, what).toBeGreaterThanOrEqual(400);
    expect(a.status, what).toBeLessThan(500);
    let body: any;
    try {
      body = JSON.parse(a.body);
    } catch {
      body = a.body;
    }
    expect(typeof body?.code, `${what}: body ${JSON.stringify(a.body)}`).toBe('string');
    expect(typeof body?.message, what).toBe('string');
    expect(a.headers['x-content-type-options'], `${what}: headers ${JSON.stringify(a.headers)}`).toBe('nosniff');
  }

  // Each of these is rejected by Node's HTTP parser and answered by Fastify's default client-error
  // handler ({"error","message","statusCode"}, no security headers) instead of the API format.
  const tenKbUtf8 = (() => {
    const rng = new Rng(SEED);
    let t = '';
    while (Buffer.byteLength(t) < 10_240) t += rng.text(64, 'éü☃中😀');
    return t;
  })();
  const parserCases: [string, string, number][] = [
    [
      'an id of 10 KB of UTF-8 text (~30 KB percent-encoded, over the 16 KB header limit)',
      `GET /jobs/${encodeURIComponent(tenKbUtf8)} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`,
      431,
    ],
    ['a raw non-ASCII byte in the request path', 'GET /jobs/\u00e9 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', 400],
    ['an unknown method', 'FOO /jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n', 400],
    [
      'two different Content-Length headers',
      'POST /jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}',
      400,
    ],
    [
      'Content-Length together with Transfer-Encoding',
      'POST /jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
      400,
    ],
    [
      'an invalid chunk size',
      'POST /jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n',
      400,
    ],
  ];
  for (const [what, request, status] of parserCases) {
    it(`${what}: ${status} in the API error format`, async () => {
      const a = await rawRequest(h.url, request, undefined, 3_000);
      expectApiError(a, what);
      expect(a.status, what).toBe(status);
      expect((await jobCount(h))).toBe(0);
    });
  }
});
