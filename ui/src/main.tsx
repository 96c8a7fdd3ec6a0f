/** The Foreman dashboard (ADR-0014): one page, hash routes, data from the public API. */
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { authState, changeKey, onKeyNeeded, storeKey, subscribeAuth } from './api';
import { KeyPrompt } from './components';
import { useRoute, type Route } from './hooks';
import { useMetrics } from './store';
import { Engines } from './views/Engines';
import { JobDetail } from './views/JobDetail';
import { Jobs } from './views/Jobs';
import { Overview } from './views/Overview';
import { Receivers } from './views/Receivers';

const TABS: { view: Route['view']; label: string; href: string }[] = [
  { view: 'overview', label: 'Overview', href: '#/' },
  { view: 'jobs', label: 'Jobs', href: '#/jobs' },
  { view: 'engines', label: 'Engines', href: '#/engines' },
  { view: 'receivers', label: 'Receivers', href: '#/receivers' },
];

function useAuth() {
  const [s, setS] = useState(authState());
  useEffect(() => subscribeAuth(() => setS(authState())), []);
  return s;
}

function App() {
  const route = useRoute();
  const auth = useAuth();
  const { metrics, error, at } = useMetrics();
  const [prompt, setPrompt] = useState<{ reason: 'missing' | 'rejected'; resolve: (k: string | null) => void } | null>(null);

  useEffect(() => {
    onKeyNeeded((reason) => new Promise((resolve) => setPrompt({ reason, resolve })));
  }, []);

  const engineUp = metrics?.has('foreman_engine_up') ? metrics.sum('foreman_engine_up') === 1 : null;
  const active = route.view === 'job' ? 'jobs' : route.view;
  return (
    <>
      <header class="top">
        <a class="brand" href="#/">
          Foreman
        </a>
        <nav>
          {TABS.map((t) => (
            <a href={t.href} class={active === t.view ? 'active' : ''} data-testid={`tab-${t.view}`}>
              {t.label}
            </a>
          ))}
        </nav>
        <div class="top-right">
          {engineUp !== null && (
            <span class={`pill ${engineUp ? 'ok' : 'bad'}`} title="foreman_engine_up">
              engine {engineUp ? 'up' : 'down'}
            </span>
          )}
          <span class={`pill ${error ? 'bad' : ''}`} title={error ? error.message : 'last refresh'}>
            {error ? 'offline' : at ? `live · ${new Date(at).toLocaleTimeString(undefined, { hour12: false })}` : 'connecting…'}
          </span>
          <button class={`btn small ${auth.unauthorized ? 'danger' : 'ghost'}`} onClick={() => void changeKey()} title="API key (kept in this tab)">
            {auth.hasKey ? 'key ✓' : 'API key'}
          </button>
          {auth.hasKey && (
            <button class="btn small ghost" onClick={() => storeKey(null)} title="forget the key">
              forget
            </button>
          )}
        </div>
      </header>
      {auth.unauthorized && !prompt && (
        <p class="banner" role="alert">
          The server answers 401 Unauthorized: set an API key.
        </p>
      )}
      <main>
        {route.view === 'overview' && <Overview />}
        {route.view === 'jobs' && <Jobs query={route.query} />}
        {route.view === 'job' && <JobDetail id={route.id} />}
        {route.view === 'engines' && <Engines />}
        {route.view === 'receivers' && <Receivers />}
      </main>
      {prompt && (
        <KeyPrompt
          reason={prompt.reason}
          onDone={(key) => {
            prompt.resolve(key);
            setPrompt(null);
          }}
        />
      )}
    </>
  );
}

render(<App />, document.getElementById('app')!);
