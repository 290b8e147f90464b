/**
 * `kiln models` (installed models: family, size, source) and `kiln rm <name>`.
 */
import type { Command } from 'commander';
import { aliasTable } from '../models/aliases.js';
import { PullError } from '../models/errors.js';
import { listModels, removeModel, type InstalledModel } from '../models/installed.js';
import { formatBytes } from '../models/pull.js';
import { kilnHome } from '../catalog/home.js';
import { ModelNotFoundError } from '../engine/errors.js';

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n') + '\n';
}

function source(m: InstalledModel): string {
  if (m.builtin) return 'built-in';
  if (!m.source) return '-';
  return `${m.source.repo}@${m.source.revision} (${m.source.commit.slice(0, 7)})`;
}

export function formatModelTable(models: InstalledModel[]): string {
  const rows = [['NAME', 'FAMILY', 'SIZE', 'SOURCE', 'ALIASES']];
  for (const m of models) rows.push([m.name, m.family, formatBytes(m.bytes), source(m), m.aliases.join(', ')]);
  return table(rows);
}

export function modelsCommand(flags: { json?: boolean; aliases?: boolean }): void {
  const home = kilnHome();
  if (flags.aliases) {
    let aliases: ReturnType<typeof aliasTable>;
    try {
      aliases = aliasTable(home);
    } catch (err) {
      if (!(err instanceof PullError)) throw err;
      process.stderr.write(`kiln: ${err.message}\n`);
      process.exitCode = 1;
      return;
    }
    if (flags.json) {
      process.stdout.write(`${JSON.stringify(aliases, null, 2)}\n`);
      return;
    }
    const rows = [['ALIAS', 'REPOSITORY', 'SIZE', 'DESCRIPTION']];
    for (const [name, a] of Object.entries(aliases).sort(([x], [y]) => x.localeCompare(y))) {
      rows.push([name, `${a.repo}${a.revision ? `@${a.revision}` : ''}`, a.size ?? '', a.description ?? '']);
    }
    process.stdout.write(table(rows));
    return;
  }
  const models = listModels({ home });
  if (flags.json) {
    process.stdout.write(`${JSON.stringify(models, null, 2)}\n`);
    return;
  }
  process.stdout.write(formatModelTable(models));
  for (const m of models.filter((x) => x.problem)) process.stderr.write(`${m.name}: ${m.problem}\n`);
}

export async function rmCommand(names: string[]): Promise<void> {
  for (const name of names) {
    try {
      const r = await removeModel(name, { home: kilnHome() });
      process.stdout.write(`removed ${r.name} (${formatBytes(r.bytes)}, ${r.dir})\n`);
    } catch (err) {
      if (!(err instanceof PullError) && !(err instanceof ModelNotFoundError)) throw err;
      process.stderr.write(`kiln: ${err.message}\n`);
      process.exitCode = 1;
    }
  }
}

export function registerModelCommands(program: Command): void {
  program
    .command('models')
    .alias('list')
    .description('list installed models: family, size on disk, source repository and revision')
    .option('--json', 'machine-readable output')
    .option('--aliases', 'list the model aliases kiln pull knows instead (built-in and $KILN_HOME/aliases.json)')
    .action(modelsCommand);
  program
    .command('rm')
    .description('remove installed models (and any unfinished pull of them)')
    .argument('<name...>', 'model names or aliases')
    .action(rmCommand);
}
