import { pino } from 'pino';
import { ConfigError, loadConfig, type Config } from './config.js';
import { Service } from './service.js';
import { DataDirLocked } from './queue/sqlite/db.js';
import { StorageUnavailable } from './errors.js';

let config: Config;
try {
  config = loadConfig(process.env);
} catch (err) {
  if (err instanceof ConfigError) {
    process.stderr.write(`foreman: invalid configuration: ${err.message}\n`);
    process.exit(2);
  }
  throw err;
}

// On a terminal, readable lines (pino-pretty, in pino's transport thread); JSON otherwise.
const logger = process.stdout.isTTY
  ? pino({ level: config.logLevel, transport: { target: 'pino-pretty', options: { colorize: true, translateTime: 'SYS:HH:MM:ss.l' } } })
  : pino({ level: config.logLevel });
let service: Service;
try {
  service = new Service({ config, logger });
  await service.start();
} catch (err) {
  if (err instanceof StorageUnavailable && err.message.startsWith('FOREMAN_DATABASE_URL')) {
    process.stderr.write(`foreman: refusing to start: ${err.message}\n`);
    logger.fatal({ code: 'database_unreachable' }, err.message);
  } else if (err instanceof DataDirLocked) {
    process.stderr.write(`foreman: refusing to start: ${err.message}\n`);
    logger.fatal({ code: 'data_dir_locked' }, err.message);
  } else logger.fatal({ err }, 'foreman could not start');
  process.exit(1);
}

let stopping = false;
for (const sig of ['SIGTERM', 'SIGINT'] as const) {
  process.on(sig, () => {
    if (stopping) {
      logger.warn({ signal: sig }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    logger.info({ signal: sig }, 'shutting down');
    service.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        logger.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  });
}
