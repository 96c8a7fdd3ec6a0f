import { useEffect, useRef, useState } from 'preact/hooks';
import { ApiError, download, getJson, postJson, readSse } from '../api';
import { ConfirmButton, ErrorNote, Panel, StateBadge } from '../components';
import { ago, fmtBytes, fmtMs, fmtTime, resultText } from '../format';
import { jobsHref, useNow, usePoll } from '../hooks';
import { isTerminal, type Job, type JobState } from '../types';

interface Live {
  content: string;
  thinking: string;
  /** Whether the events stream is open. */
  streaming: boolean;
  error: string | null;
}

/**
 * GET /jobs/<id>/events through fetch (so the key header goes along): `state` events (with ids,
 * resumed with Last-Event-ID after a drop) and `delta` events (tokens while working).
 */
function useJobEvents(id: string, onState: (state: JobState) => void): Live {
  const [live, setLive] = useState<Live>({ content: '', thinking: '', streaming: false, error: null });
  const onStateRef = useRef(onState);
  onStateRef.current = onState;
  useEffect(() => {
    setLive({ content: '', thinking: '', streaming: false, error: null });
    const ctl = new AbortController();
    let lastId: string | undefined;
    let ended = false;
    void (async () => {
      for (let tries = 0; !ctl.signal.aborted && !ended; tries++) {
        try {
          setLive((l) => ({ ...l, streaming: true, error: null }));
          await readSse(`/jobs/${encodeURIComponent(id)}/events`, {
            ...(lastId ? { lastEventId: lastId } : {}),
            signal: ctl.signal,
            onEvent: (m) => {
              if (m.event === 'state') {
                if (m.id) lastId = m.id;
                const d = JSON.parse(m.data) as { state: JobState };
                if (isTerminal(d.state)) ended = true;
                // A new generation (first run or a retry) starts from nothing.
                if (d.state === 'working') setLive((l) => ({ ...l, content: '', thinking: '' }));
                onStateRef.current(d.state);
              } else if (m.event === 'delta') {
                const d = JSON.parse(m.data) as { content?: string; thinking?: string };
                setLive((l) => ({ ...l, content: l.content + (d.content ?? ''), thinking: l.thinking + (d.thinking ?? '') }));
              }
            },
          });
          tries = 0;
        } catch (err) {
          if (ctl.signal.aborted) return;
          const msg = err instanceof Error ? err.message : String(err);
          setLive((l) => ({ ...l, error: msg }));
          // Gone for good; anything else (a drop, 401 until a key is given, 429, 503) is tried again.
          if (err instanceof ApiError && (err.status === 404 || err.status === 410)) ended = true;
        }
        setLive((l) => ({ ...l, streaming: false }));
        if (!ended) await new Promise((r) => setTimeout(r, Math.min(5, tries + 1) * 1000));
      }
    })();
    return () => ctl.abort();
  }, [id]);
  return live;
}

export function JobDetail({ id }: { id: string }) {
  const job = usePoll((signal) => getJson<Job>(`/jobs/${encodeURIComponent(id)}`, signal), 2000, [id]);
  const live = useJobEvents(id, () => job.refresh());
  const [notice, setNotice] = useState<{ text: string; bad?: boolean } | null>(null);
  const now = useNow();
  const j = job.data;

  const act = async (what: string, path: string) => {
    setNotice(null);
    try {
      const r = await postJson<{ requeued?: string[]; state?: string }>(path);
      setNotice({ text: r.requeued ? `${what}: ${r.requeued.length} event${r.requeued.length === 1 ? '' : 's'} queued again (${r.requeued.join(', ')})` : `${what}: done` });
    } catch (err) {
      setNotice({ text: `${what}: ${err instanceof Error ? err.message : String(err)}`, bad: true });
    }
    job.refresh();
  };

  if (!j) {
    return (
      <div class="view">
        <ErrorNote error={job.error} />
        {!job.error && <p class="muted">Loading…</p>}
      </div>
    );
  }

  const base = `/jobs/${encodeURIComponent(j.job_id)}`;
  const active = !isTerminal(j.state);
  const result = resultText(j.result);
  // Live tokens while the job runs (from when the page opened: they are not replayed); the
  // stored result once it is finished.
  const showLive = active && (live.content !== '' || live.thinking !== '' || j.state === 'working');
  const deliveries = j.webhook?.deliveries ?? [];
  const anyFailed = deliveries.some((d) => d.status === 'failed');
  const anyPending = deliveries.some((d) => d.status === 'pending');

  return (
    <div class="view" data-testid="view-job">
      <ErrorNote error={job.error} />
      <Panel
        title={
          <>
            <a href="#/jobs" class="muted">
              Jobs
            </a>{' '}
            / <span class="mono">{j.job_id}</span> <StateBadge state={j.state} />
          </>
        }
        actions={
          <>
            {active && <ConfirmButton label="Cancel job" confirm="Cancel this job?" tone="danger" testid="cancel" onConfirm={() => act('Cancel', `${base}/cancel`)} />}
            {j.webhook && anyFailed && (
              <button class="btn" data-testid="redeliver-failed" disabled={anyPending} onClick={() => void act('Redeliver failed', `${base}/webhooks/redeliver`)}>
                Redeliver failed events
              </button>
            )}
          </>
        }
        testid="job-head"
      >
        {notice && (
          <p class={notice.bad ? 'error' : 'notice'} data-testid="notice">
            {notice.text}
          </p>
        )}
        <dl class="facts" data-testid="job-facts">
          <dt>state</dt>
          <dd data-testid="job-state">{j.state}</dd>
          <dt>model</dt>
          <dd>
            <a href={jobsHref({ model: j.model })}>{j.model}</a>
          </dd>
          <dt>attempt</dt>
          <dd>
            {j.attempt} of {j.max_attempts}
          </dd>
          <dt>priority</dt>
          <dd>{j.priority}</dd>
          <dt>created</dt>
          <dd>
            {fmtTime(j.created_at)} <span class="muted">({ago(j.created_at, now)})</span>
          </dd>
          <dt>started</dt>
          <dd>{fmtTime(j.started_at)}</dd>
          <dt>finished</dt>
          <dd>{fmtTime(j.finished_at)}</dd>
          {j.state === 'queued' && (
            <>
              <dt>queue position</dt>
              <dd>
                {j.queue_position ?? '—'}
                {j.estimated_start_at && <span class="muted"> (start ≈ {fmtTime(j.estimated_start_at)})</span>}
              </dd>
            </>
          )}
          <dt>deadline</dt>
          <dd>{fmtTime(j.deadline)}</dd>
          <dt>ran on</dt>
          <dd>
            <span data-testid="job-engine">{j.engine ?? '—'}</span>
            {j.instance && (
              <span class="muted">
                {' '}
                by instance <span data-testid="job-instance">{j.instance}</span>
              </span>
            )}
          </dd>
          <dt>load</dt>
          <dd>{fmtMs(j.load_ms)}</dd>
          <dt>tokens</dt>
          <dd>
            {j.usage.prompt_tokens ?? '—'} in / {j.usage.completion_tokens ?? '—'} out
          </dd>
          <dt>conversation</dt>
          <dd class="mono">
            <a href={jobsHref({ conversation_id: j.conversation_id })}>{j.conversation_id}</a>
            {j.waiting_for_previous && <span class="chip">waiting for previous</span>}
          </dd>
          {Object.keys(j.metadata).length > 0 && (
            <>
              <dt>metadata</dt>
              <dd>
                {Object.entries(j.metadata).map(([k, v]) => (
                  <span class="chip">
                    {k}={v}
                  </span>
                ))}
              </dd>
            </>
          )}
        </dl>
      </Panel>

      <div class="two">
        <Panel title="Transitions" testid="transitions">
          <ol class="timeline">
            {j.transitions.map((t, i) => {
              const next = j.transitions[i + 1];
              const end = next ? new Date(next.at).getTime() : isTerminal(t.state) ? null : now;
              return (
                <li class={`tl state-${t.state}`} data-testid="transition">
                  <StateBadge state={t.state} />
                  <span>{fmtTime(t.at)}</span>
                  <span class="muted">attempt {t.attempt}</span>
                  {end !== null && <span class="muted">{fmtMs(end - new Date(t.at).getTime())}</span>}
                </li>
              );
            })}
          </ol>
          {j.error && (
            <p class="error" data-testid="job-error">
              <b>{j.error.code}</b>: {j.error.message}
            </p>
          )}
        </Panel>

        <Panel
          title={
            <>
              Output {live.streaming && active && <span class="live-dot" title="streaming" />}
            </>
          }
          testid="output"
        >
          {showLive && (
            <div data-testid="live-output" class="output">
              {live.thinking && <div class="thinking">{live.thinking}</div>}
              <div class="content">{live.content}</div>
            </div>
          )}
          {!showLive && result && (
            <div data-testid="result-output" class="output">
              {result.thinking && <div class="thinking">{result.thinking}</div>}
              <div class="content">{result.content}</div>
            </div>
          )}
          {!showLive && !result && <p class="muted">{active ? 'Waiting for the job to start…' : 'No output.'}</p>}
          {showLive && <p class="note">Tokens as they stream, from when this page opened; the whole reply shows once the job is done.</p>}
          {live.error && active && <p class="muted">events: {live.error}</p>}
          {j.result !== null && j.result !== undefined && (
            <details>
              <summary>Result (JSON)</summary>
              <pre class="json" data-testid="result-json">
                {JSON.stringify(j.result, null, 2)}
              </pre>
            </details>
          )}
        </Panel>
      </div>

      {j.artifacts.length > 0 && (
        <Panel title="Artifacts" testid="artifacts">
          <table class="grid">
            <thead>
              <tr>
                <th>name</th>
                <th>type</th>
                <th class="num">size</th>
                <th>sha256</th>
              </tr>
            </thead>
            <tbody>
              {j.artifacts.map((a) => {
                const path = `${base}/artifacts/${encodeURIComponent(a.name)}`;
                return (
                  <tr>
                    <td>
                      <a
                        href={path}
                        onClick={(e) => {
                          e.preventDefault();
                          download(path, a.name).catch((err: unknown) => setNotice({ text: String(err), bad: true }));
                        }}
                      >
                        {a.name}
                      </a>
                    </td>
                    <td>{a.content_type}</td>
                    <td class="num">{fmtBytes(a.size)}</td>
                    <td class="mono muted">{a.sha256.slice(0, 16)}…</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </Panel>
      )}

      <Panel title="Webhook" testid="webhook">
        {!j.webhook && <p class="muted">This job has no state_webhook_url.</p>}
        {j.webhook && (
          <>
            <p>
              <span class="mono">{j.webhook.url}</span> <span class="muted">events: {j.webhook.events.join(', ')}</span>
            </p>
            <table class="grid" data-testid="deliveries">
              <thead>
                <tr>
                  <th>event</th>
                  <th>status</th>
                  <th class="num">attempts</th>
                  <th class="num">last status</th>
                  <th>last error</th>
                  <th>next attempt</th>
                  <th>delivered</th>
                  <th />
                </tr>
              </thead>
              <tbody>
                {deliveries.map((d) => (
                  <tr data-testid="delivery" data-state={d.state}>
                    <td>
                      <StateBadge state={d.state} />
                    </td>
                    <td>
                      <span class={`badge delivery-${d.status}`} data-testid="delivery-status">
                        {d.status}
                      </span>
                    </td>
                    <td class="num" data-testid="delivery-attempts">
                      {d.attempts}
                    </td>
                    <td class="num">{d.last_status_code ?? '—'}</td>
                    <td class="wrap">{d.last_error ?? '—'}</td>
                    <td>{d.status === 'pending' ? fmtTime(d.next_attempt_at) : '—'}</td>
                    <td>{fmtTime(d.delivered_at)}</td>
                    <td>
                      <button
                        class="btn small"
                        data-testid="redeliver"
                        disabled={anyPending}
                        title={anyPending ? 'events are still being delivered' : `send the ${d.state} event again`}
                        onClick={() => void act(`Redeliver ${d.state}`, `${base}/webhooks/redeliver?state=${d.state}`)}
                      >
                        Redeliver
                      </button>
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
            {deliveries.length === 0 && <p class="muted">No events yet.</p>}
          </>
        )}
      </Panel>
    </div>
  );
}
