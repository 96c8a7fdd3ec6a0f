import { StringDecoder } from 'node:string_decoder';
import { randomBytes } from 'node:crypto';
import type { Clock } from '../domain.js';
import { Conflict, NotFound, Validation } from '../errors.js';
import type { BatchEndpoint, FileLine, FileRecord, QueueDriver } from '../queue/driver.js';
import { batchOutputLine, mapChat, mapEmbed, unsubmittedLine } from './openai.js';
import { keyIdOf, scopeOf, type Principal } from './principal.js';
import { MAX_JSON_DEPTH, tooDeep } from './rules.js';

export interface FilesSettings {
  /** Requests (non-blank lines) in one upload. */
  maxLines: number;
  /** One line's size. */
  maxLineBytes: number;
  /** How long an uploaded file is kept. */
  fileTtlMs: number;
}

/** Lines stored per transaction while an upload streams in (and at most this many bytes of them). */
const STAGE_LINES = 500;
const STAGE_BYTES = 1 << 20;
/** Lines (or results) read per page when a file's content streams out. */
const PAGE = 500;
/** Lines removed per transaction when a file is deleted. */
const DELETE_STEP = 5000;

const ENDPOINTS: readonly BatchEndpoint[] = ['/v1/chat/completions', '/v1/embeddings'];

export const newFileId = () => `file-${randomBytes(12).toString('hex')}`;

const notFound = (id: string) => new NotFound('file_not_found', `no file with id ${JSON.stringify(id.slice(0, 80))}`, 'file_id');

/** A refused line: the message names it; `field` is the parameter at fault. */
const lineError = (n: number, field: string, why: string, code = 'invalid_value') => new Validation(`line ${n}: ${why}`, field, code);

/**
 * Uploaded files and the output and error files of batches (ADR-0015). An upload streams: each
 * line is validated as it arrives (its request mapped exactly as the synchronous endpoint would),
 * and lines are stored in chunks under an `uploading` file row, a staging set nobody sees. A bad
 * line removes the staged rows and answers 400 naming the line; only a complete upload becomes
 * `processed`. Output and error files are not stored: their lines are made from the batch's jobs
 * when read, so they are partial while the batch runs.
 */
export class Files {
  constructor(
    private readonly driver: QueueDriver,
    private readonly clock: Clock,
    private readonly settings: FilesSettings,
  ) {}

  async upload(source: AsyncIterable<Buffer>, filename: string, who: Principal): Promise<FileRecord> {
    const { driver, settings } = this;
    const decoder = new StringDecoder('utf8');
    const firstLine = new Map<string, number>();
    let buf = '';
    let n = 0;
    let count = 0;
    let bytes = 0;
    let endpoint: BatchEndpoint | null = null;
    let staged: FileLine[] = [];
    let stagedBytes = 0;
    let fileSeq: number | null = null;
    const id = newFileId();
    const now = this.clock.now();

    const handle = (raw: string) => {
      n++;
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (line.trim() === '') return;
      if (++count > settings.maxLines) throw lineError(n, 'file', `the file holds more than FOREMAN_BATCH_MAX_LINES (${settings.maxLines}) requests`, 'too_many_lines');
      let obj: unknown;
      try {
        obj = JSON.parse(line);
      } catch {
        throw lineError(n, 'file', 'is not valid JSON', 'invalid_json_line');
      }
      if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw lineError(n, 'file', 'is not a JSON object', 'invalid_json_line');
      const o = obj as Record<string, unknown>;
      for (const k of Object.keys(o)) {
        if (!['custom_id', 'method', 'url', 'body'].includes(k)) throw lineError(n, k, `${k} is not a field of a batch request (custom_id, method, url, body)`, 'unsupported_parameter');
      }
      const cid = o.custom_id;
      if (typeof cid !== 'string' || cid.length < 1 || cid.length > 512) throw lineError(n, 'custom_id', 'custom_id must be a string of 1 to 512 characters');
      const seen = firstLine.get(cid);
      if (seen !== undefined) throw lineError(n, 'custom_id', `custom_id ${JSON.stringify(cid.slice(0, 80))} repeats line ${seen}: every custom_id must be unique`, 'duplicate_custom_id');
      if (o.method !== 'POST') throw lineError(n, 'method', 'method must be "POST"');
      if (typeof o.url !== 'string' || !ENDPOINTS.includes(o.url as BatchEndpoint)) throw lineError(n, 'url', `url must be one of ${ENDPOINTS.join(', ')}`);
      const url = o.url as BatchEndpoint;
      if (endpoint === null) endpoint = url;
      else if (url !== endpoint) throw lineError(n, 'url', `url ${url} differs from the first request's (${endpoint}): a batch file has one endpoint`);
      const body = o.body;
      if (body === null || typeof body !== 'object' || Array.isArray(body)) throw lineError(n, 'body', 'body must be a JSON object (the request)');
      const deep = tooDeep(body as Record<string, unknown>, MAX_JSON_DEPTH);
      if (deep !== null) throw lineError(n, `body.${deep}`, `body.${deep} is nested deeper than ${MAX_JSON_DEPTH} levels`);
      if ((body as { stream?: unknown }).stream === true) throw lineError(n, 'body.stream', 'body.stream must not be true in a batch');
      try {
        if (url === '/v1/embeddings') mapEmbed(body, 'body.');
        else mapChat(body, 'body.');
      } catch (err) {
        if (err instanceof Validation) throw lineError(n, err.field ?? 'body', err.message, err.code);
        throw err;
      }
      firstLine.set(cid, n);
      staged.push({ n, customId: cid, body: line });
      stagedBytes += line.length;
    };

    const flush = async () => {
      if (staged.length === 0) return;
      const lines = staged;
      staged = [];
      stagedBytes = 0;
      if (fileSeq === null) {
        fileSeq = await driver.fileInsert({
          file: { id, keyId: keyIdOf(who), filename, endpoint: endpoint!, createdAt: now, expiresAt: now + settings.fileTtlMs },
          lines,
        });
      } else await driver.fileLinesAppend({ fileSeq, lines });
    };

    try {
      for await (const chunk of source) {
        bytes += chunk.length;
        buf += decoder.write(chunk);
        let start = 0;
        let nl: number;
        while ((nl = buf.indexOf('\n', start)) >= 0) {
          handle(buf.slice(start, nl));
          start = nl + 1;
        }
        buf = buf.slice(start);
        if (buf.length > settings.maxLineBytes) {
          throw lineError(n + 1, 'file', `is longer than FOREMAN_MAX_BODY_BYTES (${settings.maxLineBytes} bytes)`, 'line_too_long');
        }
        // Stored as it arrives, a chunk per transaction; awaiting it is the upload's backpressure.
        if (staged.length >= STAGE_LINES || stagedBytes >= STAGE_BYTES) await flush();
      }
      buf += decoder.end();
      if (buf.length > 0) handle(buf);
      if (count === 0) throw new Validation('the file holds no requests', 'file', 'empty_file');
      await flush();
      if (!(await driver.fileFinish({ fileSeq: fileSeq!, bytes, lines: count }))) throw new Conflict('upload_lost', 'the upload was removed while it was stored; send it again');
    } catch (err) {
      if (fileSeq !== null) await this.remove(fileSeq).catch(() => undefined); // nothing stays of a refused upload
      throw err;
    }
    return (await driver.fileGet({ id }))!;
  }

  /** A file the caller may see (its own; every file for open and admin), with its size, or 404. */
  async get(id: string, who: Principal): Promise<FileRecord> {
    const f = await this.visible(id, who);
    if (f.bytes === null) return { ...f, bytes: await this.outputBytes(f) };
    return f;
  }

  /** The file, if the caller may see it (another key's is, to it, a file that does not exist). */
  private async visible(id: string, who: Principal): Promise<FileRecord> {
    const f = await this.driver.fileGet({ id });
    const scope = scopeOf(who);
    if (!f || f.status !== 'processed' || (scope !== undefined && (f.keyId ?? '') !== scope)) throw notFound(id);
    return f;
  }

  async list(q: { limit: number; after?: string; purpose?: string }, who: Principal): Promise<{ files: FileRecord[]; hasMore: boolean }> {
    if (!(q.limit >= 1 && q.limit <= 10_000)) throw new Validation('limit must be 1 to 10000', 'limit');
    const scope = scopeOf(who);
    const before = q.after === undefined ? undefined : (await this.visible(q.after, who)).seq;
    const rows = await this.driver.filesList({
      limit: q.limit + 1,
      ...(before !== undefined ? { beforeSeq: before } : {}),
      ...(scope !== undefined ? { keyId: scope } : {}),
      ...(q.purpose !== undefined ? { purpose: q.purpose } : {}),
    });
    const hasMore = rows.length > q.limit;
    if (hasMore) rows.pop();
    return { files: await Promise.all(rows.map(async (f) => (f.bytes === null ? { ...f, bytes: await this.outputBytes(f) } : f))), hasMore };
  }

  /** The file's content as it streams out (JSONL), page by page. */
  async content(id: string, who: Principal): Promise<AsyncGenerator<string>> {
    const f = await this.visible(id, who);
    return this.lines(f);
  }

  private async *lines(f: FileRecord): AsyncGenerator<string> {
    const { driver } = this;
    if (f.purpose === 'batch') {
      for (let after = 0; ; ) {
        const page = await driver.fileLinesPage({ fileSeq: f.seq, afterN: after, limit: PAGE });
        if (page.length === 0) return;
        yield page.map((l) => `${l.body}\n`).join('');
        after = page[page.length - 1]!.n;
      }
    }
    const batch = await driver.batchGet({ seq: f.batchSeq! });
    if (!batch) return;
    const role = f.role === 'error' ? 'error' : 'output';
    for (let after = 0; ; ) {
      const page = await driver.batchResultsPage({ batchSeq: batch.seq, role, afterSeq: after, limit: PAGE });
      if (page.length === 0) break;
      yield page.map((r) => `${batchOutputLine(batch, r)}\n`).join('');
      after = page[page.length - 1]!.seq;
    }
    // Lines that never became jobs (the batch was cancelled, expired or failed first) are failures too.
    if (role === 'error' && batch.ending !== null && batch.inputFileSeq !== null) {
      for (let after = batch.lastLine; ; ) {
        const page = await driver.fileLinesPage({ fileSeq: batch.inputFileSeq, afterN: after, limit: PAGE });
        if (page.length === 0) break;
        yield page.map((l) => `${unsubmittedLine(batch, l.n, l.customId)}\n`).join('');
        after = page[page.length - 1]!.n;
      }
    }
  }

  /**
   * An output file's size: counted from its lines; kept once its batch has ended (it cannot change
   * then). Whether it had ended is read before the count: a batch that ends while its lines are
   * counted may have finished lines the count did not see.
   */
  private async outputBytes(f: FileRecord): Promise<number> {
    const before = await this.driver.batchGet({ seq: f.batchSeq! });
    const ended = before !== null && ['completed', 'failed', 'expired', 'cancelled'].includes(before.status);
    let bytes = 0;
    for await (const chunk of this.lines(f)) bytes += Buffer.byteLength(chunk, 'utf8');
    if (ended) await this.driver.fileBytesSet({ fileSeq: f.seq, bytes });
    return bytes;
  }

  async delete(id: string, who: Principal): Promise<void> {
    const f = await this.visible(id, who);
    await this.remove(f.seq);
  }

  /** Removes a file's lines in steps (a large file never holds the database long), then the file. */
  async remove(fileSeq: number): Promise<void> {
    while ((await this.driver.fileLinesDelete({ fileSeq, limit: DELETE_STEP })) > 0) {
      /* next step */
    }
    await this.driver.fileDelete({ fileSeq });
  }
}
