import { chromium, type Browser } from 'playwright-core';

/** Debian's chromium (`.ci/run` installs it); FOREMAN_CHROMIUM points elsewhere. */
export const CHROMIUM = process.env.FOREMAN_CHROMIUM ?? '/usr/bin/chromium';

/**
 * Headless Chromium for the dashboard tests and screenshots. The machine has no network: the
 * flags keep Chromium from trying to reach anything (updates, sync, QUIC) beyond the page's
 * loopback server.
 */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}
