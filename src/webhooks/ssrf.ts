import dns from 'node:dns';
import net from 'node:net';
import os from 'node:os';
import { buildConnector } from 'undici';

/**
 * The SSRF guard: every webhook connection's address is checked after DNS resolution, at
 * connect time, so DNS rebinding cannot get past it (ADR-0007, threat model). Always refused:
 * link-local and every cloud-metadata address, the special ranges that can reach them, and
 * Foreman's own listening address and port. Loopback and private ranges are refused when
 * `blockPrivate` is set, except for the ranges named in `allowNets`.
 */
export class BlockedAddressError extends Error {
  readonly code = 'ERR_FOREMAN_BLOCKED_ADDRESS';
  constructor(host: string, address: string, why: string) {
    super(`refused to connect to ${host} (${address}): ${why}`);
    this.name = 'BlockedAddressError';
  }
}

const always = new net.BlockList();
always.addSubnet('169.254.0.0', 16, 'ipv4'); // link-local, incl. 169.254.169.254 metadata
always.addSubnet('fe80::', 10, 'ipv6'); // link-local
always.addAddress('fd00:ec2::254', 'ipv6'); // AWS metadata over IPv6
always.addAddress('0.0.0.0', 'ipv4');
always.addAddress('::', 'ipv6');
always.addAddress('100.100.100.200', 'ipv4'); // Alibaba Cloud metadata
always.addAddress('192.0.0.192', 'ipv4'); // Oracle Cloud metadata
always.addSubnet('192.0.0.0', 24, 'ipv4'); // IETF protocol assignments
always.addSubnet('198.18.0.0', 15, 'ipv4'); // benchmarking

const privateRanges = new net.BlockList();
privateRanges.addSubnet('127.0.0.0', 8, 'ipv4');
privateRanges.addSubnet('10.0.0.0', 8, 'ipv4');
privateRanges.addSubnet('172.16.0.0', 12, 'ipv4');
privateRanges.addSubnet('192.168.0.0', 16, 'ipv4');
privateRanges.addSubnet('100.64.0.0', 10, 'ipv4'); // carrier-grade NAT
privateRanges.addSubnet('0.0.0.0', 8, 'ipv4');
privateRanges.addAddress('::1', 'ipv6');
privateRanges.addSubnet('fc00::', 7, 'ipv6'); // unique local

export interface GuardOptions {
  blockPrivate: boolean;
  /** Ranges allowed even when private addresses are blocked (FOREMAN_WEBHOOK_ALLOW_NETS, see `blockListOf`). */
  allow?: net.BlockList;
  /** Foreman's own listening address and port, read at connect time (known once it listens). */
  self?: () => { address: string; port: number } | null;
}

/** A BlockList from CIDRs such as `10.1.0.0/16` or `fd00::/8`; throws on a malformed entry. */
export function blockListOf(cidrs: string[]): net.BlockList {
  const list = new net.BlockList();
  for (const c of cidrs) {
    const [addr, bits] = c.split('/');
    const family = net.isIP(addr ?? '');
    const prefix = Number(bits);
    if (!family || !/^\d{1,3}$/.test(bits ?? '') || prefix > (family === 4 ? 32 : 128)) throw new Error(`"${c}" is not a CIDR such as 10.0.0.0/8`);
    list.addSubnet(addr!, prefix, family === 4 ? 'ipv4' : 'ipv6');
  }
  return list;
}

/** The 16 bytes of an IPv6 address (which may end in a dotted IPv4), or null. */
function ipv6Bytes(address: string): number[] | null {
  let a = address.toLowerCase();
  let tail: number[] = [];
  const dotted = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(a);
  if (dotted) {
    tail = dotted[2]!.split('.').map(Number);
    a = `${dotted[1]}0:0`;
  }
  const [head, rest] = a.split('::') as [string, string | undefined];
  const h = head === '' ? [] : head.split(':');
  const r = rest === undefined || rest === '' ? [] : rest.split(':');
  const fill = rest === undefined ? 0 : 8 - h.length - r.length;
  if (fill < 0) return null;
  const groups = [...h, ...Array(fill).fill('0'), ...r];
  if (groups.length !== 8 || groups.some((g) => !/^[0-9a-f]{1,4}$/.test(g))) return null;
  const bytes = groups.flatMap((g) => [parseInt(g, 16) >> 8, parseInt(g, 16) & 255]);
  if (tail.length === 4) bytes.splice(12, 4, ...tail);
  return bytes;
}

/**
 * IPv4 carried in an IPv6 address: IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::/96 and the
 * local-use 64:ff9b:1::/48) or 6to4 (2002:aabb:ccdd::/48). Null for any other address.
 */
function embeddedIPv4(address: string): string | null {
  const b = ipv6Bytes(address);
  if (!b) return null;
  const v4 = (i: number) => `${b[i]}.${b[i + 1]}.${b[i + 2]}.${b[i + 3]}`;
  const zero = (from: number, to: number) => b.slice(from, to).every((x) => x === 0);
  if (zero(0, 10) && b[10] === 0xff && b[11] === 0xff) return v4(12); // ::ffff:a.b.c.d
  if (b[0] === 0x00 && b[1] === 0x64 && b[2] === 0xff && b[3] === 0x9b) {
    if (zero(4, 12)) return v4(12); // 64:ff9b::/96
    if (b[4] === 0x00 && b[5] === 0x01) return v4(12); // 64:ff9b:1::/48 (local use)
  }
  if (b[0] === 0x20 && b[1] === 0x02) return v4(2); // 6to4
  return null;
}

const LOOPBACK = new net.BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

/** Whether `address` reaches this host's own listener bound to `listen` (which may be a wildcard). */
function isSelf(address: string, family: 'ipv4' | 'ipv6', listen: string): boolean {
  if (LOOPBACK.check(address, family)) return true;
  if (address === listen) return true;
  if (listen !== '0.0.0.0' && listen !== '::') return false;
  return Object.values(os.networkInterfaces()).some((ifs) => (ifs ?? []).some((i) => i.address === address));
}

/** Returns why the address is refused, or null if it may be used. */
export function refusal(address: string, blockPrivate: boolean, port?: number, opts: Omit<GuardOptions, 'blockPrivate'> = {}): string | null {
  let family: 'ipv4' | 'ipv6' = net.isIP(address) === 6 ? 'ipv6' : 'ipv4';
  let addr = address;
  // An IPv6 address carrying an IPv4 one (mapped, NAT64) is judged as the IPv4 address.
  const v4 = family === 'ipv6' ? embeddedIPv4(address) : null;
  if (v4) {
    addr = v4;
    family = 'ipv4';
  }
  if (always.check(addr, family)) return 'link-local, cloud-metadata and special-purpose addresses are never allowed';
  const self = opts.self?.();
  if (self && port === self.port && isSelf(addr, family, self.address)) return "Foreman's own address is never allowed";
  if (!blockPrivate) return null;
  if (opts.allow?.check(addr, family)) return null;
  if (privateRanges.check(addr, family)) {
    return 'loopback and private addresses are blocked (FOREMAN_WEBHOOK_BLOCK_PRIVATE; FOREMAN_WEBHOOK_ALLOW_NETS names allowed ranges)';
  }
  return null;
}

type LookupCb = (err: NodeJS.ErrnoException | null, address: string | dns.LookupAddress[], family?: number) => void;

/** A dns.lookup that refuses blocked answers. */
function guardedLookup(opts: GuardOptions, port: number) {
  return (hostname: string, options: dns.LookupOptions, cb: LookupCb) => {
    dns.lookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return cb(err, []);
      for (const a of addresses) {
        const why = refusal(a.address, opts.blockPrivate, port, opts);
        if (why) return cb(new BlockedAddressError(hostname, a.address, why) as unknown as NodeJS.ErrnoException, []);
      }
      if (options.all) return cb(null, addresses);
      const first = addresses[0];
      if (!first) return cb(Object.assign(new Error(`no address for ${hostname}`), { code: 'ENOTFOUND' }), []);
      return cb(null, first.address, first.family);
    });
  };
}

/** An undici `connect` function applying the guard to IP literals and to every DNS answer. */
export function guardedConnector(opts: GuardOptions & { timeoutMs: number }): buildConnector.connector {
  // One connector per destination port, so each DNS answer is judged with the port it is for.
  const byPort = new Map<number, buildConnector.connector>();
  const connectorFor = (port: number) => {
    let c = byPort.get(port);
    if (!c) byPort.set(port, (c = buildConnector({ timeout: opts.timeoutMs, lookup: guardedLookup(opts, port) } as buildConnector.BuildOptions)));
    return c;
  };
  return (options, callback) => {
    const host = options.hostname.replace(/^\[|\]$/g, '');
    const port = Number(options.port) || (options.protocol === 'https:' ? 443 : 80);
    const base = connectorFor(port);
    if (net.isIP(host)) {
      const why = refusal(host, opts.blockPrivate, port, opts);
      if (why) {
        process.nextTick(callback, new BlockedAddressError(host, host, why), null);
        return undefined as never;
      }
    }
    return base(options, callback);
  };
}
