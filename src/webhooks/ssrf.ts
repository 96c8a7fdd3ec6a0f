import dns from 'node:dns';
import net from 'node:net';
import { buildConnector } from 'undici';

/**
 * The SSRF guard: every webhook connection's address is checked after DNS resolution, at
 * connect time, so DNS rebinding cannot get past it. Link-local and cloud-metadata addresses
 * are always refused; loopback and private ranges when `blockPrivate` is set.
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

const privateRanges = new net.BlockList();
privateRanges.addSubnet('127.0.0.0', 8, 'ipv4');
privateRanges.addSubnet('10.0.0.0', 8, 'ipv4');
privateRanges.addSubnet('172.16.0.0', 12, 'ipv4');
privateRanges.addSubnet('192.168.0.0', 16, 'ipv4');
privateRanges.addSubnet('100.64.0.0', 10, 'ipv4'); // carrier-grade NAT
privateRanges.addSubnet('0.0.0.0', 8, 'ipv4');
privateRanges.addAddress('::1', 'ipv6');
privateRanges.addSubnet('fc00::', 7, 'ipv6'); // unique local

/** Returns why the address is refused, or null if it may be used. */
export function refusal(address: string, blockPrivate: boolean): string | null {
  let family: 'ipv4' | 'ipv6' = net.isIP(address) === 6 ? 'ipv6' : 'ipv4';
  let addr = address;
  // IPv4-mapped IPv6 (::ffff:a.b.c.d) is judged as the IPv4 address it carries.
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped?.[1]) {
    addr = mapped[1];
    family = 'ipv4';
  }
  if (always.check(addr, family)) return 'link-local and cloud-metadata addresses are never allowed';
  if (blockPrivate && privateRanges.check(addr, family)) {
    return 'loopback and private addresses are blocked (FOREMAN_WEBHOOK_BLOCK_PRIVATE=true)';
  }
  return null;
}

type LookupCb = (err: NodeJS.ErrnoException | null, address: string | dns.LookupAddress[], family?: number) => void;

/** A dns.lookup that refuses blocked answers. */
function guardedLookup(blockPrivate: boolean) {
  return (hostname: string, options: dns.LookupOptions, cb: LookupCb) => {
    dns.lookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return cb(err, []);
      for (const a of addresses) {
        const why = refusal(a.address, blockPrivate);
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
export function guardedConnector(opts: { blockPrivate: boolean; timeoutMs: number }): buildConnector.connector {
  const base = buildConnector({ timeout: opts.timeoutMs, lookup: guardedLookup(opts.blockPrivate) } as buildConnector.BuildOptions);
  return (options, callback) => {
    const host = options.hostname.replace(/^\[|\]$/g, '');
    if (net.isIP(host)) {
      const why = refusal(host, opts.blockPrivate);
      if (why) {
        process.nextTick(callback, new BlockedAddressError(host, host, why), null);
        return undefined as never;
      }
    }
    return base(options, callback);
  };
}
