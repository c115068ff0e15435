// Assemble dist/: the page (src/) and noVNC's ES modules (core/ and the vendored pako they import),
// copied from node_modules as published, so the browser loads them unbundled.
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const novnc = join(here, "node_modules", "@novnc", "novnc");
const dist = join(here, "dist");

rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, "novnc"), { recursive: true });
cpSync(join(here, "src"), dist, { recursive: true });
for (const part of ["core", "vendor", "AUTHORS", "docs/LICENSE.MPL-2.0", "docs/LICENSE.BSD-2-Clause"]) {
  cpSync(join(novnc, part), join(dist, "novnc", part), { recursive: true });
}
const version = JSON.parse(readFileSync(join(novnc, "package.json"), "utf8")).version;
writeFileSync(join(dist, "VERSION"), `@novnc/novnc ${version}\n`);
console.log(`console assets: ${dist} (@novnc/novnc ${version})`);
