/**
 * Not on PostgreSQL yet: files and batches (ADR-0015). The driver refuses them with
 * `Unavailable('not_supported_on_postgres')` (ADR-0011), so these conformance tests are skipped
 * for it, and only these.
 */
export const UNSUPPORTED_ON_POSTGRES = [
  'an upload is invisible until finished; lines come back in order; a repeated custom_id is refused by the store',
  'lines become jobs chunk by chunk; counters follow the jobs; the last job ends the batch, in order through finalizing',
  'cancel: unsubmitted lines count as canceled, waiting jobs end in chunks, a running one finishes; then cancelled, with its webhook event',
  'expiry fails the waiting jobs batch_expired and ends the batch expired; expired batches go with their jobs, which the job TTL leaves alone',
] as const;
