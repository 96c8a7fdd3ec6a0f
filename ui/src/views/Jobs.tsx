import { useEffect, useState } from 'preact/hooks';
import { getJson } from '../api';
import { ErrorNote, Panel, StateBadge } from '../components';
import { ago, fmtTime } from '../format';
import { jobHref, jobsHref, useNow, usePoll } from '../hooks';
import { useMetrics } from '../store';
import { JOB_STATES, type ListReply } from '../types';

const PAGE = 20;

/**
 * The filters GET /jobs supports (src/http/schemas.ts ListQuery): state, model, conversation_id,
 * created_after / created_before and metadata.<key>=<value>. Only those have inputs here.
 */
const FILTERS = ['state', 'model', 'conversation_id', 'created_after', 'metadata'] as const;

export function Jobs({ query }: { query: URLSearchParams }) {
  const filters = Object.fromEntries(FILTERS.map((f) => [f, query.get(f) ?? ''])) as Record<(typeof FILTERS)[number], string>;
  // Keyset paging: the cursors of the pages before this one, so "Newer" can go back.
  const [cursors, setCursors] = useState<string[]>([]);
  const cursor = cursors[cursors.length - 1];
  const key = `${query.toString()}|${cursor ?? ''}`;
  const { metrics } = useMetrics();
  const now = useNow();
  // What is typed in the filter inputs, until applied.
  const [draft, setDraft] = useState(filters);
  useEffect(() => setDraft(filters), [query.toString()]);
  const input = (name: (typeof FILTERS)[number]) => ({
    name,
    value: draft[name],
    onInput: (e: Event) => setDraft({ ...draft, [name]: (e.currentTarget as HTMLInputElement).value }),
  });

  const page = usePoll(
    (signal) => {
      const q = new URLSearchParams({ limit: String(PAGE) });
      if (filters.state) q.set('state', filters.state);
      if (filters.model) q.set('model', filters.model);
      if (filters.conversation_id) q.set('conversation_id', filters.conversation_id);
      if (filters.created_after) q.set('created_after', new Date(filters.created_after).toISOString());
      const m = /^([^=]+)=(.*)$/.exec(filters.metadata);
      if (m) q.set(`metadata.${m[1]!.trim()}`, m[2]!.trim());
      if (cursor) q.set('cursor', cursor);
      return getJson<ListReply>(`/jobs?${q.toString()}`, signal);
    },
    2000,
    [key],
  );

  const models = metrics ? [...metrics.sumBy('foreman_jobs_submitted_total', 'model').keys()].sort() : [];
  const apply = (next: Partial<Record<(typeof FILTERS)[number], string>>) => {
    setCursors([]);
    location.hash = jobsHref({ ...filters, ...next });
  };

  return (
    <div class="view" data-testid="view-jobs">
      <Panel title="Jobs">
        <form
          class="filters"
          onSubmit={(e) => {
            e.preventDefault();
            apply(Object.fromEntries(FILTERS.map((k) => [k, draft[k].trim()])));
          }}
        >
          <label>
            state
            <select name="state" value={filters.state} onChange={(e) => apply({ ...draft, state: e.currentTarget.value })} data-testid="filter-state">
              <option value="">any</option>
              {JOB_STATES.map((s) => (
                <option value={s}>{s}</option>
              ))}
            </select>
          </label>
          <label>
            model
            <input {...input('model')} list="models" placeholder="any" data-testid="filter-model" />
            <datalist id="models">
              {models.map((m) => (
                <option value={m} />
              ))}
            </datalist>
          </label>
          <label>
            conversation
            <input {...input('conversation_id')} placeholder="conversation id" />
          </label>
          <label>
            created after
            <input {...input('created_after')} type="datetime-local" />
          </label>
          <label>
            metadata
            <input {...input('metadata')} placeholder="key=value" />
          </label>
          <button class="btn primary" type="submit">
            Filter
          </button>
          {FILTERS.some((f) => filters[f]) && (
            <a class="btn ghost" href="#/jobs" onClick={() => setCursors([])}>
              Clear
            </a>
          )}
        </form>
        <ErrorNote error={page.error} />
        <table class="grid jobs" data-testid="jobs-table">
          <thead>
            <tr>
              <th>job</th>
              <th>state</th>
              <th>model</th>
              <th class="num">priority</th>
              <th class="num">attempt</th>
              <th>ran on</th>
              <th>created</th>
              <th>finished</th>
              <th>metadata</th>
            </tr>
          </thead>
          <tbody>
            {page.data?.jobs.map((j) => (
              <tr data-testid="job-row" data-job={j.job_id}>
                <td class="mono">
                  <a href={jobHref(j.job_id)}>{j.job_id}</a>
                </td>
                <td>
                  <StateBadge state={j.state} />
                </td>
                <td>{j.model}</td>
                <td class="num">{j.priority}</td>
                <td class="num">{j.attempt}</td>
                <td data-testid="job-ran-on">
                  {j.engine ?? '—'}
                  {j.instance && <span class="muted"> · {j.instance}</span>}
                </td>
                <td title={j.created_at}>
                  {fmtTime(j.created_at)} <span class="muted">({ago(j.created_at, now)})</span>
                </td>
                <td title={j.finished_at ?? ''}>{fmtTime(j.finished_at)}</td>
                <td>
                  {Object.entries(j.metadata).map(([k, v]) => (
                    <span class="chip">
                      {k}={v}
                    </span>
                  ))}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
        {page.data && page.data.jobs.length === 0 && <p class="muted">No jobs match.</p>}
        <div class="pager">
          <button class="btn" disabled={cursors.length === 0} onClick={() => setCursors(cursors.slice(0, -1))} data-testid="page-newer">
            ← Newer
          </button>
          <span class="muted">page {cursors.length + 1}</span>
          <button class="btn" disabled={!page.data?.next_cursor} onClick={() => page.data?.next_cursor && setCursors([...cursors, page.data.next_cursor])} data-testid="page-older">
            Older →
          </button>
        </div>
      </Panel>
    </div>
  );
}
