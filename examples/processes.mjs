import { getOrCreateSandbox } from "hive";

const sandbox = await getOrCreateSandbox("processes", {
  fs: [{ backend: "local", mount: "/workspace" }],
});

// A string runs through /bin/sh -c; an array is an argv.
const listing = await sandbox.exec("echo hello > /workspace/a.txt && ls /workspace");
console.log(listing.exitCode, listing.stdout);

const upper = await sandbox.exec(["tr", "a-z", "A-Z"], { stdin: "shout\n", env: { LANG: "C" } });
console.log(upper.stdout);

const slow = await sandbox.exec(["sleep", "10"], { timeoutMs: 500 });
console.log("timed out:", slow.timedOut, slow.signal); // true SIGKILL

// Streaming: processes of one sandbox share its loopback, /tmp and mounts.
const server = sandbox.spawn(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], { cwd: "/workspace" });
const page = await sandbox.exec("for i in 1 2 3 4 5 6 7 8 9 10; do curl -s http://127.0.0.1:8000/a.txt && break; sleep 0.3; done");
console.log("from the server:", page.stdout);
server.kill();
console.log(await server.wait()); // { exitCode: null, signal: 'SIGTERM' }
await sandbox.close();
