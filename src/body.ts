import type { Readable } from 'node:stream';

const ignore = () => {};

/**
 * Throws away a response body we no longer want. undici's body emits RequestAbortedError when
 * destroyed before its end; with no listener that would crash the process.
 */
export function discardBody(body: Readable): void {
  body.on('error', ignore);
  body.destroy();
}
