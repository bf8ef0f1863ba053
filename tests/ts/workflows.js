'use strict';
// Workflow code of the TypeScript SDK harness (bundled once by `harness.js bundle`).
// Every large value is made here from (size, seed, marker) with blob.js, so the only large
// things on the wire are the ones a scenario is about.

const wf = require('@temporalio/workflow');
const { blob } = require('./blob');

const acts = wf.proxyActivities({
  startToCloseTimeout: '60 seconds',
  // One attempt: a refused activity completion fails the workflow at once, not after retries.
  retry: { maximumAttempts: 1 },
});

/** Hands a `size`-byte value made here to an activity (the worker's workflow task completion
 * carries it in ScheduleActivityTask). */
async function activityInput(size, seed, marker) {
  const data = blob(size, seed, marker);
  return await acts.check(data, size, seed, marker);
}

/** An activity returns a `size`-byte value (RespondActivityTaskCompleted carries it). */
async function activityResult(size, seed, marker) {
  const data = await acts.make(size, seed, marker);
  return { len: data.length, equal: data === blob(size, seed, marker) };
}

/** One workflow task schedules `count` activities with a `size`-byte input each: a single
 * RespondWorkflowTaskCompleted of count * size bytes, every payload under the offload threshold. */
async function fanOut(count, size, seed, marker) {
  const calls = [];
  for (let i = 0; i < count; i++) {
    const s = `${seed}-${i}`;
    calls.push(acts.check(blob(size, s, marker), size, s, marker));
  }
  const results = await Promise.all(calls);
  return { count: results.length, allEqual: results.every((r) => r.equal), lens: results.map((r) => r.len) };
}

const bigQuery = wf.defineQuery('big');
const done = wf.defineSignal('done');

/** Answers the query `big` with a `size`-byte value until signalled `done`. */
async function queryAnswer(size, seed, marker) {
  const data = blob(size, seed, marker);
  let finished = false;
  wf.setHandler(bigQuery, () => data);
  wf.setHandler(done, () => {
    finished = true;
  });
  await wf.condition(() => finished);
  return { len: data.length };
}

const dataSignal = wf.defineSignal('data');

/** Started by signal-with-start whose signal carries a `size`-byte value. */
async function signalWithStart(size, seed, marker) {
  let got = null;
  wf.setHandler(dataSignal, (value) => {
    got = value;
  });
  await wf.condition(() => got !== null);
  return { len: got.length, equal: got === blob(size, seed, marker) };
}

module.exports = { activityInput, activityResult, fanOut, queryAnswer, signalWithStart };
