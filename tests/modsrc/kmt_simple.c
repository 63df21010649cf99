// SPDX-License-Identifier: GPL-2.0
/* kmt_simple: imports only _printk (pr_info) and msleep. */
#include <linux/delay.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>

static int __init kmt_simple_init(void)
{
	msleep(1);
	pr_info("kmt_simple: loaded\n");
	return 0;
}

static void __exit kmt_simple_exit(void)
{
	pr_info("kmt_simple: unloaded\n");
}

module_init(kmt_simple_init);
module_exit(kmt_simple_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: pr_info and msleep only");
