/* nativereload's in-flight gate, as a model spin explores exhaustively (issue 13).
 *
 * Run it with tools/model/check.sh (CI does): the correct protocol must pass,
 * and each broken variant below must be caught.
 *
 *   spin -a tools/model/gate.pml && cc -O2 -DSAFETY -o pan pan.c && ./pan -m200000   # every scenario
 *
 * Broken variants (spin -DNAME ...; each must fail, and check.sh checks that it does):
 *   -DNO_ENTERS_RECHECK      try_drain does not re-read enters after the holds check
 *   -DENTERS_FIRST -DNO_ENTERS_RECHECK
 *                            today's gate without the re-check, reading enters before exits
 *   -DNO_RETIRED_CHECK       a call does not re-check retired after counting itself in
 *   -DEXCLUSIVE_ENTERS_FIRST the exclusive reload reads enters before exits while it waits
 * (-DENTERS_FIRST alone passes: with the re-read of enters, the order of the
 * first two reads no longer matters.)
 *
 * The protocol (per image: counters enters and exits, which only grow, holds,
 * up and down; flags retired, paused, drained; one slot per module):
 *   call through the slot   g = slot.current; enters++; if g.retired or g.paused:
 *                           exits++, try_drain(g), wait while paused, start again;
 *                           else run the function; if it returns an object that
 *                           stays bound to g, holds++ (before the exit); exits++;
 *                           if g.retired: try_drain(g)
 *   routed call             (an object bound to g holds one of g's holds) enters++;
 *                           the binding gone (a destructor on another thread)?
 *                           exits++, try_drain(g), error; paused? exits++, wait,
 *                           again; run; exits++; if retired: try_drain(g)
 *   release                 remove the binding; holds--; try_drain(g)
 *   pin                     admitted like a call, then holds++, exits++
 *   reload                  slot.current = new; old.retired = 1; try_drain(old)
 *   exclusive reload        old.paused = 1; wait until exits == enters (reading
 *                           exits first), or give up: paused = 0; then
 *                           slot.current = new; old.retired = 1; old.paused = 0;
 *                           try_drain(old)
 *   try_drain(g)            if !retired or drained: return; x = exits; e = enters;
 *                           if x != e: return; if holds != 0: return; if enters != e:
 *                           return; CAS drained 0 -> 1; the winner closes the image
 *
 * Every read and write of a shared variable is its own step, in one total
 * order (the C gate's sequentially consistent atomics; the GIL orders the
 * Python gate's). Properties, checked in every interleaving:
 *   1. no image is closed while a call runs in it, or while a binding, pin or
 *      lease on it exists (asserted when the image closes, and where a call runs);
 *   2. every retired image is closed once no call is in it and nothing holds it
 *      (asserted when every process has finished); no process waits for ever
 *      (spin's invalid-end-state check).
 *   3. an exclusive reload swaps only when no call is running in the old image.
 */

#define NIMAGES 4

byte current = 0;                       /* slot.current: image 0 serves first */
byte next_image = 1;
byte enters[NIMAGES];
byte exits[NIMAGES];
byte holds[NIMAGES];
bool retired[NIMAGES];
bool paused[NIMAGES];
bool drained[NIMAGES];

/* ghost state: what the properties talk about, invisible to the protocol */
byte inside[NIMAGES];                   /* calls running in the image */
byte held[NIMAGES];                     /* bindings, pins and leases that exist */
bool closed[NIMAGES];

/* one object bound to an image (made by a call, used by a routed call, released by a destructor) */
byte bound_image = 255;
bool bound_alive = false;

inline run_in(g) {
    inside[g]++;
    assert(!closed[g]);                 /* property 1: the code is still mapped */
    inside[g]--
}

/* the locals try_drain and admit use, declared once in each process that inlines them */
#define GATE_LOCALS byte dx, de, dt; bool r2, p2

inline try_drain(g) {
    dt = retired[g];
    if
    :: dt ->
        dt = drained[g];
        if
        :: !dt ->
#ifdef ENTERS_FIRST
            de = enters[g];
            dx = exits[g];
#else
            dx = exits[g];
            de = enters[g];
#endif
            if
            :: dx == de ->
                dt = holds[g];
                if
                :: dt == 0 ->
#ifndef NO_ENTERS_RECHECK
                    dt = enters[g];
                    if
                    :: dt == de ->
#endif
                        atomic {        /* compare-and-swap drained 0 -> 1: the winner closes */
                            if
                            :: !drained[g] ->
                                drained[g] = true;
                                assert(inside[g] == 0 && held[g] == 0);     /* property 1 */
                                closed[g] = true
                            :: else -> skip
                            fi
                        }
#ifndef NO_ENTERS_RECHECK
                    :: else -> skip
                    fi
#endif
                :: else -> skip
                fi
            :: else -> skip
            fi
        :: else -> skip
        fi
    :: else -> skip
    fi;
    dx = 0; de = 0; dt = 0
}

/* Admission through the slot, shared by calls and pins: leaves g entered and admitted. */
inline admit(g) {
    do
    :: g = current;
       enters[g]++;
#ifdef NO_RETIRED_CHECK
       r2 = false;
#else
       r2 = retired[g];
#endif
       p2 = paused[g];
       if
       :: r2 || p2 ->
           exits[g]++;
           try_drain(g);
           if
           :: p2 -> (!paused[g])        /* wait until the exclusive reload is done */
           :: else -> skip
           fi
       :: else -> break
       fi
    od;
    r2 = false; p2 = false
}

/* A call through the slot; with returns_object, the result stays bound to the image. */
proctype Caller(bool returns_object) {
    byte g;
    GATE_LOCALS;
    admit(g);
    run_in(g);
    if
    :: returns_object ->
        holds[g]++;                     /* the object holds the image, before the exit */
        atomic { bound_image = g; bound_alive = true; held[g]++ }      /* and exists from here */
    :: else -> skip
    fi;
    exits[g]++;
    if
    :: retired[g] -> try_drain(g)
    :: else -> skip
    fi
}

/* A call routed to the image an object is bound to. */
proctype RoutedCaller() {
    byte g;
    bool alive, p;
    GATE_LOCALS;
    (bound_image != 255);
    g = bound_image;
    do
    :: enters[g]++;
       alive = bound_alive;
       if
       :: !alive ->                     /* released meanwhile: an error for the caller */
           exits[g]++;
           try_drain(g);
           break
       :: else -> skip
       fi;
       p = paused[g];
       if
       :: p ->
           exits[g]++;
           (!paused[g])
       :: else ->
           run_in(g);
           exits[g]++;
           if
           :: retired[g] -> try_drain(g)
           :: else -> skip
           fi;
           break
       fi
    od
}

/* The object's destructor, on another thread: remove the binding, then the hold. */
proctype Destructor() {
    byte g;
    GATE_LOCALS;
    (bound_alive);                      /* the object exists */
    g = bound_image;
    atomic { bound_alive = false; held[g]-- };      /* the binding is gone */
    holds[g]--;
    try_drain(g)
}

/* Pin the current image (a lease works the same), call through the pin, then release it. */
proctype Pinner() {
    byte g;
    bool p;
    GATE_LOCALS;
    admit(g);
    held[g]++;
    holds[g]++;
    exits[g]++;
    do                                  /* a call through the pin: routed to g */
    :: enters[g]++;
       p = paused[g];
       if
       :: p ->
           exits[g]++;
           (!paused[g])
       :: else ->
           run_in(g);
           exits[g]++;
           if
           :: retired[g] -> try_drain(g)
           :: else -> skip
           fi;
           break
       fi
    od;
    held[g]--;                          /* unpin: the pin is gone, then its hold */
    holds[g]--;
    try_drain(g)
}

proctype Reloader() {
    byte old, new;
    GATE_LOCALS;
    atomic { new = next_image; next_image++ };
    old = current;
    current = new;
    retired[old] = true;
    try_drain(old)
}

proctype ExclusiveReloader() {
    byte old, new, x, e;
    GATE_LOCALS;
    atomic { new = next_image; next_image++ };
    old = current;
    paused[old] = true;
    do
    ::
#ifdef EXCLUSIVE_ENTERS_FIRST
       e = enters[old];
       x = exits[old];
#else
       x = exits[old];
       e = enters[old];
#endif
       if
       :: x == e ->
           assert(inside[old] == 0);    /* property 3 */
           current = new;
           retired[old] = true;
           paused[old] = false;
           try_drain(old);
           break
       :: else ->                       /* wait for a call to come or go, then look again */
           (exits[old] != x || enters[old] != e)
       fi
    :: paused[old] = false;             /* timed out: refuse, and the old image keeps serving */
       break
    od;
    x = 0; e = 0
}

/* The scenarios: small groups of processes, each explored exhaustively. By
 * default init picks one nondeterministically, so one run covers them all;
 * spin -DSCENARIO=N checks one, and -DSCENARIO=0 runs every process at once
 * (large: minutes and gigabytes). */
inline scenario(n) {
    if
    :: n == 1 ->                        /* two calls racing a reload */
        atomic { run Caller(false); run Caller(false); run Reloader() }
    :: n == 2 ->                        /* a call racing two reloads */
        atomic { run Caller(false); run Reloader(); run Reloader() }
    :: n == 3 ->                        /* an object bound to the image, used and released while a reload retires it */
        atomic { run Caller(true); run RoutedCaller(); run Destructor(); run Reloader() }
    :: n == 4 ->                        /* an object, its routed call and an exclusive reload */
        atomic { run Caller(true); run RoutedCaller(); run Destructor(); run ExclusiveReloader() }
    :: n == 5 ->                        /* a pin used while an exclusive reload waits, and a call */
        atomic { run Pinner(); run Caller(false); run ExclusiveReloader() }
    :: n == 6 ->                        /* a pin and a call racing a reload */
        atomic { run Pinner(); run Caller(false); run Reloader() }
    :: n == 0 ->                        /* everything at once */
        atomic {
            run Caller(false); run Caller(true); run RoutedCaller(); run Destructor(); run Pinner();
            run Reloader(); run ExclusiveReloader()
        }
    fi
}

init {
    byte g;
#ifdef SCENARIO
    scenario(SCENARIO);
#else
    if
    :: scenario(1)
    :: scenario(2)
    :: scenario(3)
    :: scenario(4)
    :: scenario(5)
    :: scenario(6)
    fi;
#endif
    (_nr_pr == 1);                      /* every other process has finished */
    for (g : 0 .. NIMAGES - 1) {
        /* property 2: a retired image nothing holds and no call is in was closed */
        assert(!retired[g] || closed[g] || held[g] > 0)
    }
}
