"""Drives a program in a pseudo-terminal from a JSON script (argv[1]).

Steps: {"send": text} types keys one at a time; {"expect": text} waits (up to "timeout" s, default 10)
until text appears in the output after the last match; {"run": [argv...]} runs a helper
command to completion (within "timeout" s, default 30); {"sleep": secs}; {"kill": "TERM"}
sends the program that signal; {"children": true} notes the program's child processes (pid
and command line); {"wchan": name} waits (up to "timeout" s) until a thread of a noted child
sleeps in the kernel function `name` (/proc/PID/task/TID/wchan; where the kernel shows no
wait channels, it waits one second instead).

Prints one JSON object on the last line of stdout: "transcript" (the whole raw output),
"children" (as noted), "exit" (the program's exit status) and "cooked" (whether the terminal
was back in canonical mode with echo once the program ended). Exits 1 (with the reason on
stderr) when an expectation fails, 2 when the program's exit status is not the script's
"exit" (default 0).
"""
import json, os, pty, select, signal, subprocess, sys, time

script = json.loads(sys.argv[1])
argv = script["argv"]
env = dict(os.environ, TERM="xterm", COLUMNS="200", LINES="50")
pid, fd = pty.fork()
if pid == 0:
    os.execvpe(argv[0], argv, env)
import fcntl, struct, termios
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
buf = b""
mark = 0
children = []

def report(status, cooked):
    print(json.dumps({"transcript": buf.decode("utf-8", "replace"), "children": children,
                      "exit": status, "cooked": cooked}))

def note_children():
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if ppid == pid:
            children.append({"pid": int(entry), "cmdline": cmdline})

def pump(deadline):
    global buf
    while True:
        left = deadline - time.time()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], min(left, 0.05))
        if fd in r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return True
            if not data:
                return True
            buf += data
            return None

def fail(reason):
    sys.stderr.write(reason + "\n")
    report(None, None)
    for p in [pid] + [c["pid"] for c in children]:
        try:
            os.kill(p, 9)
        except OSError:
            pass
    sys.exit(1)

def sleeping_in(name):
    """True or False; None where the kernel does not name wait channels (all read "0")."""
    named = False
    for c in children:
        try:
            for tid in os.listdir("/proc/%d/task" % c["pid"]):
                with open("/proc/%d/task/%s/wchan" % (c["pid"], tid)) as f:
                    wchan = f.read()
                if wchan == name:
                    return True
                named = named or wchan not in ("", "0")
        except OSError:
            pass
    return False if named else None

for step in script["steps"]:
    if "send" in step:
        # One key at a time, as a person types: rustyline may not notice keys that arrive
        # together with others while it also waits on its external printer.
        for ch in step["send"]:
            os.write(fd, ch.encode())
            end = time.time() + 0.03
            while pump(end) is None:
                pass
    elif "sleep" in step:
        end = time.time() + step["sleep"]
        while pump(end) is None:
            pass
    elif "kill" in step:
        os.kill(pid, getattr(signal, "SIG" + step["kill"]))
    elif "children" in step:
        note_children()
    elif "wchan" in step:
        end = time.time() + step.get("timeout", 10)
        while True:
            state = sleeping_in(step["wchan"])
            if state:
                break
            if state is None and time.time() >= end - step.get("timeout", 10) + 1:
                # Wait channels are not shown here: a second will have to do.
                break
            if pump(min(end, time.time() + 0.02)) is False and time.time() >= end:
                fail("no child came to sleep in %r" % step["wchan"])
    elif "run" in step:
        try:
            subprocess.run(step["run"], check=True, stdout=subprocess.DEVNULL,
                           timeout=step.get("timeout", 30))
        except (subprocess.SubprocessError, OSError) as e:
            fail("%r failed: %s" % (step["run"], e))
    elif "expect" in step:
        want = step["expect"].encode()
        end = time.time() + step.get("timeout", 10)
        while True:
            i = buf.find(want, mark)
            if i >= 0:
                mark = i + len(want)
                break
            res = pump(end)
            if res is False:
                fail("timed out waiting for %r" % step["expect"])
            if res is True and buf.find(want, mark) < 0:
                fail("the program ended before %r" % step["expect"])
end = time.time() + 10
while pump(end) is None:
    pass
for _ in range(100):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    fail("the program did not exit after the last step")
lflag = termios.tcgetattr(fd)[3]
cooked = lflag & termios.ICANON != 0 and lflag & termios.ECHO != 0
code = os.waitstatus_to_exitcode(status)
report(code, cooked)
sys.exit(0 if code == script.get("exit", 0) else 2)
