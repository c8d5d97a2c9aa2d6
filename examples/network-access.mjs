import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { getOrCreateSandbox } from "hive";

const sandbox = await getOrCreateSandbox("network-access", {
  egress: [
    // First match wins: this deny comes before the wildcard that would allow it.
    { access: "deny", host: "upload.pypi.org" },
    { access: "allow", host: "*.pypi.org", ports: [443] }, // pypi.org and every subdomain
    { access: "allow", host: "api.github.com", methods: ["GET"], paths: ["/repos/*/*", "/zen"] },
    {
      access: "allow",
      host: "api.example.com",
      paths: ["/v1/**"],
      // Set on every request this rule allows; the sandbox never sees the value.
      override: { headers: { Authorization: `Bearer ${process.env.EXAMPLE_TOKEN ?? "test-token"}` } },
    },
  ],
});

// A dry run: how the rules in force decide a request, without sending anything.
console.log(sandbox.decide({ host: "upload.pypi.org", scheme: "https" })); // denied by rule 0
console.log(sandbox.decide({ host: "api.github.com", method: "DELETE", path: "/zen" })); // denied: no rule allows DELETE

const models = await sandbox.exec(["curl", "-s", "https://api.example.com/v1/models"]);
console.log(models.stdout); // the upstream saw the Authorization header; the sandbox did not

// Tighten at runtime: requests decided after the promise resolves follow the new rules.
const current = await sandbox.getConfig(); // the override value comes back as "[redacted]"
await sandbox.applyConfig({ ...current, egress: current.egress?.filter((rule) => rule.host !== "api.example.com") });
const after = await sandbox.exec(["curl", "-sS", "https://api.example.com/v1/models"]);
console.log("after applyConfig:", after.stdout); // hive: GET api.example.com/v1/models denied by this sandbox's egress policy (…)

// The same policy for a client that runs outside any sandbox.
const proxy = await sandbox.proxy();
const dir = mkdtempSync(join(tmpdir(), "hive-example-"));
writeFileSync(join(dir, "ca.pem"), proxy.ca);
const zen = execFileSync("curl", ["-s", "--proxy", proxy.url, "--cacert", join(dir, "ca.pem"), "https://api.github.com/zen"], { encoding: "utf8" });
console.log("through sandbox.proxy():", zen);
await proxy.close();
await sandbox.close();
