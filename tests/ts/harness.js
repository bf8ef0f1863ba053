'use strict';
// TypeScript SDK harness driven by tests/test_ts_sdk_limits.py (plain JavaScript: no compile step).
//
//   node harness.js bundle OUT_FILE
//       bundles workflows.js once (webpack); every `run` loads that file (`workflowBundle`).
//   node harness.js run --address HOST:PORT --namespace NS --bundle FILE --scenario NAME
//                       --marker MARKER --seed SEED [--size BYTES] [--count N] [--budget SECONDS]
//       starts a worker and a client connected to --address with the SDK's default options (only
//       address and namespace set), runs one scenario and prints one line
//       `PGW-TS-RESULT {json}` (also when the scenario fails: ok=false and what the SDK reported).
//
// The packages come from the tools dir (scripts/setup.sh): the caller sets NODE_PATH to its
// node_modules, and the bundle resolves @temporalio/workflow there too.

const fs = require('fs');
const path = require('path');
const { blob } = require('./blob');

const RESULT_PREFIX = 'PGW-TS-RESULT ';

function parseArgs(argv) {
  const out = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      out[a.slice(2)] = argv[i + 1];
      i++;
    } else {
      out._.push(a);
    }
  }
  return out;
}

function nodeModulesDirs() {
  return (process.env.NODE_PATH || '').split(path.delimiter).filter(Boolean);
}

async function bundle(outFile) {
  const { bundleWorkflowCode } = require('@temporalio/worker');
  const started = Date.now();
  const { code } = await bundleWorkflowCode({
    workflowsPath: require.resolve('./workflows.js'),
    // workflows.js lives in the repository, the SDK in the tools dir: let webpack look there.
    webpackConfigHook: (config) => {
      config.resolve = config.resolve || {};
      config.resolve.modules = [...(config.resolve.modules || ['node_modules']), ...nodeModulesDirs()];
      return config;
    },
  });
  fs.writeFileSync(outFile, code);
  return { ok: true, bytes: code.length, seconds: (Date.now() - started) / 1000 };
}

// ---------------------------------------------------------------------------------------------
// errors as the SDK reports them

function describeError(err) {
  if (err === null || err === undefined) return null;
  const chain = [];
  let e = err;
  for (let depth = 0; e && depth < 8; depth++) {
    chain.push({
      name: e.name || (e.constructor && e.constructor.name) || typeof e,
      message: String(e.message === undefined ? e : e.message).slice(0, 2000),
      code: e.code,
      type: e.type,
    });
    e = e.cause;
  }
  return chain;
}

/** WorkflowTaskFailed, WorkflowTaskTimedOut and ActivityTaskFailed events of a history. */
function failuresIn(history) {
  const out = [];
  for (const ev of (history && history.events) || []) {
    const at = ev.eventTime ? new Date(Number(ev.eventTime.seconds) * 1000 + Math.floor((ev.eventTime.nanos || 0) / 1e6)).toISOString() : null;
    const wtf = ev.workflowTaskFailedEventAttributes;
    if (wtf) out.push({ event: 'WorkflowTaskFailed', at, cause: wtf.cause, message: wtf.failure && wtf.failure.message });
    const wto = ev.workflowTaskTimedOutEventAttributes;
    if (wto) out.push({ event: 'WorkflowTaskTimedOut', at, cause: wto.timeoutType, message: `started event ${wto.startedEventId}` });
    const atf = ev.activityTaskFailedEventAttributes;
    if (atf) out.push({ event: 'ActivityTaskFailed', at, message: atf.failure && atf.failure.message });
  }
  return out;
}

/** Resolves with the workflow's result; rejects when the worker keeps failing the workflow task
 * (attempt 3 or more pending after a WorkflowTaskFailed), with the failures it reported to the
 * server, after terminating the workflow. Timed-out attempts (a slow machine: a sticky task not
 * picked up within 10 s) do not count: the workflow's execution timeout bounds those. */
async function resultOrStuck(handle) {
  let stop = false;
  let stuck = null;
  const watcher = (async () => {
    while (!stop) {
      await new Promise((r) => setTimeout(r, 1000));
      if (stop) return;
      let desc;
      try {
        desc = await handle.describe();
      } catch (_) {
        continue;
      }
      const pending = desc.raw.pendingWorkflowTask;
      if (!pending || pending.attempt < 3) continue;
      let failures;
      try {
        failures = failuresIn(await handle.fetchHistory());
      } catch (_) {
        continue;
      }
      // The server records the first failure of a run of attempts only (later ones are
      // transient): the last workflow task outcome in the history tells why attempts repeat.
      const last = failures.filter((f) => f.event.startsWith('WorkflowTask')).pop();
      if (!last || last.event !== 'WorkflowTaskFailed') continue;
      stuck = new Error(`workflow task on attempt ${pending.attempt}: WorkflowTaskFailed(${last.cause}): ${last.message}`);
      stuck.name = 'WorkflowTaskStuck';
      stuck.failures = failures;
      try {
        await handle.terminate('pgw-ts harness: workflow task keeps failing');
      } catch (_) {
        /* already closed */
      }
      throw stuck;
    }
  })();
  try {
    return await Promise.race([handle.result(), watcher]);
  } catch (err) {
    // The termination may end handle.result() before the watcher rethrows: report why.
    throw stuck || err;
  } finally {
    stop = true;
  }
}

function withTimeout(promise, seconds, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error(`${what}: no answer in ${seconds}s`), { name: 'HarnessTimeout' })), seconds * 1000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// scenarios: each returns {workflowId, result, ...} or throws what the SDK reported

const activities = {
  /** Compares what arrived with what was sent. */
  async check(data, size, seed, marker) {
    return { len: data.length, equal: data === blob(size, seed, marker) };
  },
  async make(size, seed, marker) {
    return blob(size, seed, marker);
  },
};

function startOptions(ctx, id) {
  return { taskQueue: ctx.taskQueue, workflowId: id, workflowExecutionTimeout: `${ctx.budget}s` };
}

const scenarios = {
  async activity_input(ctx) {
    const id = (ctx.workflowId = `ts-ai-${ctx.seed}`);
    const handle = await ctx.client.workflow.start('activityInput', { ...startOptions(ctx, id), args: [ctx.size, ctx.seed, ctx.marker] });
    const result = await resultOrStuck(handle);
    return { workflowId: id, result, ok: result.equal === true && result.len === ctx.size };
  },

  async activity_result(ctx) {
    const id = (ctx.workflowId = `ts-ar-${ctx.seed}`);
    const handle = await ctx.client.workflow.start('activityResult', { ...startOptions(ctx, id), args: [ctx.size, ctx.seed, ctx.marker] });
    const result = await resultOrStuck(handle);
    return { workflowId: id, result, ok: result.equal === true && result.len === ctx.size };
  },

  async fan_out(ctx) {
    const id = (ctx.workflowId = `ts-fo-${ctx.seed}`);
    const handle = await ctx.client.workflow.start('fanOut', { ...startOptions(ctx, id), args: [ctx.count, ctx.size, ctx.seed, ctx.marker] });
    const result = await resultOrStuck(handle);
    const ok = result.count === ctx.count && result.allEqual === true && result.lens.every((l) => l === ctx.size);
    return { workflowId: id, result: { count: result.count, allEqual: result.allEqual }, ok };
  },

  async query_answer(ctx) {
    const id = (ctx.workflowId = `ts-qa-${ctx.seed}`);
    const handle = await ctx.client.workflow.start('queryAnswer', { ...startOptions(ctx, id), args: [ctx.size, ctx.seed, ctx.marker] });
    try {
      const answer = await withTimeout(handle.query('big'), ctx.budget, 'query big');
      const equal = answer === blob(ctx.size, ctx.seed, ctx.marker);
      await handle.signal('done');
      const result = await resultOrStuck(handle);
      return { workflowId: id, result: { queryLen: answer.length, queryEqual: equal, ...result }, ok: equal && result.len === ctx.size };
    } catch (err) {
      try {
        await handle.terminate('pgw-ts harness: query failed');
      } catch (_) {
        /* already closed */
      }
      throw err;
    }
  },

  async signal_with_start(ctx) {
    const id = (ctx.workflowId = `ts-sws-${ctx.seed}`);
    const data = blob(ctx.size, ctx.seed, ctx.marker);
    const handle = await ctx.client.workflow.signalWithStart('signalWithStart', {
      ...startOptions(ctx, id), args: [ctx.size, ctx.seed, ctx.marker], signal: 'data', signalArgs: [data],
    });
    const result = await resultOrStuck(handle);
    return { workflowId: id, result, ok: result.equal === true && result.len === ctx.size };
  },
};

// ---------------------------------------------------------------------------------------------

function limitsOf(resp) {
  const l = (resp.namespaceInfo && resp.namespaceInfo.limits) || null;
  if (!l) return null;
  const n = (v) => (v === null || v === undefined ? null : Number(v));
  return {
    blobSizeLimitError: n(l.blobSizeLimitError),
    memoSizeLimitError: n(l.memoSizeLimitError),
    workflowTaskCompletionSizeLimitError: n(l.workflowTaskCompletionSizeLimitError),
  };
}

async function run(args) {
  const { NativeConnection, Worker } = require('@temporalio/worker');
  const { Connection, Client } = require('@temporalio/client');
  const started = Date.now();
  const ctx = {
    namespace: args.namespace || 'default',
    scenario: args.scenario,
    marker: args.marker,
    seed: args.seed,
    size: Number(args.size || 3 * 1000 * 1000),
    count: Number(args.count || 60),
    budget: Number(args.budget || 60),
    taskQueue: `ts-${args.seed}`,
  };
  const scenario = scenarios[ctx.scenario];
  if (!scenario) throw new Error(`unknown scenario ${ctx.scenario}; known: ${Object.keys(scenarios).join(', ')}`);
  if (!ctx.marker || !ctx.seed) throw new Error('--marker and --seed are required');

  // Default options: only the address (and the namespace below).
  const connection = await Connection.connect({ address: args.address });
  const nativeConnection = await NativeConnection.connect({ address: args.address });
  const out = { scenario: ctx.scenario, ok: false };
  try {
    out.limits = limitsOf(await connection.workflowService.describeNamespace({ namespace: ctx.namespace }));
    ctx.client = new Client({ connection, namespace: ctx.namespace });
    const worker = await Worker.create({
      connection: nativeConnection,
      namespace: ctx.namespace,
      taskQueue: ctx.taskQueue,
      workflowBundle: { codePath: args.bundle },
      activities,
    });
    let outcome;
    await worker.runUntil(async () => {
      try {
        outcome = await scenario(ctx);
      } catch (err) {
        outcome = { error: describeError(err), failures: err.failures, workflowId: ctx.workflowId };
      }
    });
    Object.assign(out, outcome);
  } finally {
    out.seconds = (Date.now() - started) / 1000;
    await connection.close();
    await nativeConnection.close();
  }
  return out;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const cmd = args._[0];
  let out;
  try {
    if (cmd === 'bundle') out = await bundle(args._[1]);
    else if (cmd === 'run') out = await run(args);
    else throw new Error(`usage: harness.js bundle OUT | run --address ... --scenario ...`);
  } catch (err) {
    out = { ok: false, error: describeError(err) };
  }
  process.stdout.write(RESULT_PREFIX + JSON.stringify(out) + '\n');
  process.exit(out.ok ? 0 : 1);
}

main();
