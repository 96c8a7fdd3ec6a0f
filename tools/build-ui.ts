/**
 * Bundles the dashboard (ui/) into dist/ui/: one JS and one CSS file with content hashes in
 * their names (served as immutable), and index.html pointing at them. Run by `npm run build`
 * after tsc has type-checked ui/ (esbuild itself does not check types). See ADR-0014.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as esbuild from 'esbuild';

const root = process.cwd();
const out = path.join(root, 'dist', 'ui');

fs.rmSync(out, { recursive: true, force: true });
const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: { app: 'ui/src/main.tsx', style: 'ui/src/style.css' },
  outdir: path.join(out, 'assets'),
  entryNames: '[name]-[hash]',
  bundle: true,
  minify: true,
  format: 'esm',
  target: ['es2022', 'chrome110', 'firefox115', 'safari16'],
  jsx: 'automatic',
  jsxImportSource: 'preact',
  metafile: true,
  logLevel: 'warning',
});

/** The output file (relative to dist/ui) built from one entry point. */
function outputOf(entry: string): string {
  for (const [file, meta] of Object.entries(result.metafile.outputs)) {
    if (meta.entryPoint === entry) return path.relative(out, path.join(root, file)).split(path.sep).join('/');
  }
  throw new Error(`build-ui: no output for ${entry}`);
}

const html = fs
  .readFileSync(path.join(root, 'ui', 'index.html'), 'utf8')
  .replace('%APP_JS%', `/ui/${outputOf('ui/src/main.tsx')}`)
  .replace('%STYLE_CSS%', `/ui/${outputOf('ui/src/style.css')}`);
fs.writeFileSync(path.join(out, 'index.html'), html);
const size = Object.values(result.metafile.outputs).reduce((a, o) => a + o.bytes, 0);
console.log(`dashboard: dist/ui (${Math.round(size / 1024)} KiB)`);
