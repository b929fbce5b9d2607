// Builds the inspector bundle: `node build.mjs [outdir]` (default ../terra_nb/static).
// The output is committed so `pip install terra_nb` needs no node; tests/test_inspector.py
// rebuilds into a temp dir and checks the committed files are byte-identical.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.resolve(process.argv[2] || path.join(here, "..", "terra_nb", "static"));
const common = { bundle: true, minify: true, legalComments: "eof", logLevel: "warning" };

await build({
  ...common,
  entryPoints: [path.join(here, "src", "inspector.js")],
  format: "esm",
  target: "es2020",
  outfile: path.join(outdir, "inspector.js"),
});
await build({
  ...common,
  entryPoints: [path.join(here, "src", "inspector.css")],
  outfile: path.join(outdir, "inspector.css"),
});
