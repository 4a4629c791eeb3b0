#!/usr/bin/env node
// Compiles devnet/contracts/src/*.sol with the `solc` npm package (standard JSON input) and writes
// one artifacts/<ContractName>.json = {"abi", "bytecode", "contractName"} per deployable contract.
// Output is deterministic: sorted keys, 2-space indent, trailing newline; files whose content is
// unchanged are not rewritten, and stale artifacts (contracts that no longer exist) are removed.
// Exit code: 0 on success (warnings are printed), 1 on any compile error.
//
// Usage (from the repo root): npm run build:contracts   or   node devnet/contracts/build.mjs

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const solc = require('solc');

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SRC_DIR = path.join(HERE, 'src');
const ARTIFACTS_DIR = path.join(HERE, 'artifacts');

const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'paris',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
};

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === 'object') {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key]);
    return out;
  }
  return value;
}

function fail(message) {
  process.stderr.write(`build-contracts: ${message}\n`);
  process.exit(1);
}

// Only sources inside src/ may be imported; they are all passed up front, so this callback is
// reached only for a missing file or an external import (which this project does not allow).
function findImports(importPath) {
  return {
    error: `import "${importPath}" not found: only files in devnet/contracts/src/ may be imported (no external libraries)`,
  };
}

function main() {
  if (!fs.existsSync(SRC_DIR)) fail(`source directory not found: ${SRC_DIR}`);
  const files = fs
    .readdirSync(SRC_DIR)
    .filter((f) => f.endsWith('.sol'))
    .sort();
  if (files.length === 0) fail(`no .sol files in ${SRC_DIR}`);

  const sources = {};
  for (const f of files) {
    sources[`src/${f}`] = { content: fs.readFileSync(path.join(SRC_DIR, f), 'utf8') };
  }
  const input = { language: 'Solidity', sources, settings: SETTINGS };

  process.stdout.write(`build-contracts: solc ${solc.version()}, ${files.length} source file(s)\n`);
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));

  const diagnostics = output.errors || [];
  const errors = diagnostics.filter((d) => d.severity === 'error');
  const warnings = diagnostics.filter((d) => d.severity !== 'error');
  for (const w of warnings) process.stderr.write(`${w.formattedMessage || w.message}\n`);
  if (errors.length > 0) {
    for (const e of errors) process.stderr.write(`${e.formattedMessage || e.message}\n`);
    fail(`${errors.length} compile error(s); no artifacts written`);
  }

  const artifacts = new Map();
  for (const sourceName of Object.keys(output.contracts || {}).sort()) {
    const contracts = output.contracts[sourceName];
    for (const contractName of Object.keys(contracts).sort()) {
      const bytecode = contracts[contractName].evm?.bytecode?.object || '';
      if (bytecode === '') continue; // interface or abstract contract: not deployable
      if (artifacts.has(contractName)) {
        fail(`duplicate contract name "${contractName}" (${artifacts.get(contractName).source} and ${sourceName})`);
      }
      artifacts.set(contractName, {
        source: sourceName,
        json: { contractName, abi: contracts[contractName].abi, bytecode: `0x${bytecode}` },
      });
    }
  }
  if (artifacts.size === 0) fail('no deployable contracts found');

  fs.mkdirSync(ARTIFACTS_DIR, { recursive: true });
  const wanted = new Set();
  for (const [name, { json }] of [...artifacts.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    const file = `${name}.json`;
    wanted.add(file);
    const target = path.join(ARTIFACTS_DIR, file);
    const text = `${JSON.stringify(sortKeys(json), null, 2)}\n`;
    const previous = fs.existsSync(target) ? fs.readFileSync(target, 'utf8') : null;
    if (previous === text) {
      process.stdout.write(`  unchanged  artifacts/${file}\n`);
    } else {
      fs.writeFileSync(target, text);
      process.stdout.write(`  wrote      artifacts/${file}\n`);
    }
  }
  for (const f of fs.readdirSync(ARTIFACTS_DIR).sort()) {
    if (f.endsWith('.json') && !wanted.has(f)) {
      fs.unlinkSync(path.join(ARTIFACTS_DIR, f));
      process.stdout.write(`  removed    artifacts/${f} (stale)\n`);
    }
  }
  process.stdout.write(`build-contracts: ${artifacts.size} artifact(s) in ${path.relative(process.cwd(), ARTIFACTS_DIR) || '.'}\n`);
}

main();
