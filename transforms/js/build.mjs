// Builds one JavaScript transform module into a component: node build.mjs SRC WIT_DIR OUT.
// WASI features the host does not grant (http, fetch-event) are left out, so the component
// imports only what trailhose links; clocks and random stay for the engine's own use (the host
// freezes and fixes them).
import { readFile, writeFile } from 'node:fs/promises';
import { componentize } from '@bytecodealliance/componentize-js';

const [src, witPath, out] = process.argv.slice(2);
if (!src || !witPath || !out) {
  console.error('usage: node build.mjs SRC WIT_DIR OUT');
  process.exit(2);
}
const { component } = await componentize({
  sourcePath: src,
  witPath,
  worldName: 'transform',
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(out, component);
